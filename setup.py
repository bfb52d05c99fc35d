"""igsearch: a small, readable PyTorch reference implementation of IG-Search."""

from setuptools import setup

setup(
    name="igsearch",
    version="0.1.0",
    description="IG-Search: step-level information-gain rewards for search-augmented reasoning",
    py_modules=[
        "igsearch",
        "fast",
        "retriever",
        "bm25",
        "credit",
        "prepare",
        "train",
        "warmup",
        "evaluate",
        "checkpoint",
        "errors",
        "bench",
        "distributed",
        "compare",
        "config",
        "lm",
        "lora",
        "memory",
    ],
    python_requires=">=3.10",
    install_requires=["torch", "transformers", "numpy", "rank-bm25", "tqdm"],
    extras_require={
        "test": ["pytest", "ruff", "peft"],  # ruff: .ci/run checks the style; peft: the LoRA tests
        "lora": ["peft"],  # --lora_rank: LoRA adapters through peft
        "gguf": ["gguf", "accelerate"],  # the offline default model ships as a GGUF file
        # prepare.py --flashrag (the paper's benchmarks), Search-R1 parquet files
        "data": ["datasets", "pyarrow"],
        "plot": ["matplotlib"],
    },
)
