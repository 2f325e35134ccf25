# rlhf_refiner on GPU clusters: the official vLLM image (CUDA, PyTorch and vLLM 0.32.0, the version the `gpu`
# extra pins), plus this project with its `gpu` extra and bubblewrap for the code reward's sandbox.
#   docker build -t rlhf-refiner:0.1.0 .
# Every manifest in cluster/ runs this image; the training entry point is scripts/train.py.
FROM vllm/vllm-openai:v0.32.0

RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY rlhf_refiner ./rlhf_refiner
RUN python3 -m pip install --no-cache-dir -e ".[gpu]"
COPY scripts ./scripts
COPY configs ./configs
COPY benchmarks ./benchmarks

ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The base image starts `vllm serve`; this one starts training (KubeRay and Slurm override it with `ray start`).
ENTRYPOINT ["python3", "scripts/train.py"]
CMD ["--config", "configs/quickstart.yaml"]
