"""
The fixed machinery behind prepare.py and train.py. DO NOT MODIFY.

Agents do not need to read this package: prepare.py is the contract (the data,
the tokenizer, the loader and the evaluation) and train.py is the research.
What lives here is operational, one concern per module, each opening with what
it holds and who may import it. Nothing here imports train.py or prepare.py.

    attention.py  the attention backends (FA4 / FA3 / FlexAttention / SDPA), chosen once
    kernels.py    the fused pieces: plain definitions first, their Triton kernels below
    gpu.py        the device, its bf16 peak, fitting the micro-batch to memory, evaluation on
                  the compiled training graphs
    guards.py     checks that stop a run whose edit would not take effect, or that diverged
    ledger.py     what the harness saw during a run: the data held for the metric, the training
                  rows and their times (the budget), the step-0 check, the one evaluation
    scoring.py    the evaluation's machinery behind prepare.evaluate_bpb: its batches, per-token
                  losses, and the checks beyond causality (targets, rescoring, unchanged weights, step 0)
    live.py       before the summary: the fixed files' functions and constants in memory against
                  their fingerprinted bytes
    report.py     the lines a run prints: identity, overhead, the summary block after `---`
    seeding.py    the seed (AUTORESEARCH_SEED), a random stream per parameter for the initial
                  weights (common random numbers), the init and data fingerprints
    forkserver.py a run forked from a server that imported torch, compile's machinery and FA4
                  once (train.py hands its run over before its own imports)

    environment.py
                  the AUTORESEARCH_* switches, all read by one rule (empty is unset, yes/no words)

    command_line.py
                  prepare.py's flags and their checks (parsed before torch loads)
    paths.py      where the prepared data lives: the cache root and its folders, the shard
                  files and the two splits (list_shards)
    files.py      file safety: writes through exclusive temporaries renamed into place, a full
                  disk in one line, json / sha256 / parquet reading, the cache lock; PrepareError
    download.py   fetching the data shards: parallel, retried with back-off, footers checked
    source.py     the --source import of local data (each file once, odd input named or counted,
                  no document in both splits), and the choice between it and the download
    tokenizer_training.py
                  training the BPE tokenizer (rustbpe) and keeping tokenizer.pkl, token_bytes.pt
                  and their manifest
    tokencache.py the token cache, the stored validation rows, the validation split's size check,
                  and the training shards past the cache, read through once and known by stamp
    prefetch.py   the loader's background thread: pinned buffers, copies to the device
    manifest.py   the cache manifest: fingerprints of the data, the tokenizer and every fixed file,
                  and the checks verify_data runs
    board.py      the night's board: results/<tag>-board.tsv, its safe appends, `spawn.sh board`
    launch.py     spawn.sh's launcher: workers in tmux and git worktrees, or Slurm; status, stop
    confirm.py    `spawn.sh confirm`: the night's baseline and best at K new seeds
"""
