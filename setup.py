"""igsearch: a small, readable PyTorch reference implementation of IG-Search."""

from setuptools import setup

setup(
    name="igsearch",
    version="0.1.0",
    description="IG-Search: step-level information-gain rewards for search-augmented reasoning",
    # the surface a learner reads, in reading order, and the programs a user runs
    py_modules=[
        "igsearch",
        "retriever",
        "step",
        "train",
        "evaluate",
        "warmup",
        "config",
        "prepare",
    ],
    # the machinery a reader may trust and skip
    packages=["machinery"],
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
