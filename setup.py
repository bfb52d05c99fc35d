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
        "prepare",
        "train",
        "warmup",
        "evaluate",
        "checkpoint",
        "errors",
        "bench",
        "distributed",
        "compare",
    ],
    python_requires=">=3.10",
    install_requires=["torch", "transformers", "numpy", "rank-bm25", "tqdm"],
    extras_require={
        "test": ["pytest"],
        "gguf": ["gguf", "accelerate"],  # the offline default model ships as a GGUF file
        "data": [
            "datasets",
            "pyarrow",
        ],  # prepare.py --flashrag (the paper's benchmarks), Search-R1 parquet files
        "plot": ["matplotlib"],
    },
)
