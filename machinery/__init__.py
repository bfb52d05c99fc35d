"""The machinery a reader of igsearch may trust and skip: nothing here is the method itself.

    lm              driving a causal LM: padding with position ids, the decoding loop, log-probs,
                    the response batch, the precision
    fast            the speed-ups, each equal to a plain function of the surface (tested)
    static_turns    a static-KV-cache twin of the decoding loop (one decode shape, for CUDA graphs)
    text            answers compared as SQuAD does (F1); outside text made safe to insert
    corpus          a wiki-18 corpus file read and checked; its BM25 index folder
    bm25            BM25 from an inverted index, rank_bm25's scores bit for bit
    remote          the client of a Search-R1 retrieval server
    server          the Search-R1 retrieval server
    loaders         question files and models, loaded and checked at run time
    run_folder      a run's folder: atomic files, checkpoints, resume
    records         a training step's log line and its health checks
    distributed     torchrun data parallelism and FSDP
    lora            LoRA adapters through peft
    memory_estimate the peak memory a run will need, from its config
    credit_page     the HTML page of one step's credit, token by token
    tables          the tables a run prints, and the paper's EM rows beside ours
    errors          one-line errors

Imports run one way: the surface (igsearch.py, step.py, train.py, ...) imports this package, and
nothing here imports the surface.
"""
