"""
Run train.py with the CUDA allocator capped to N GiB, as on a GPU with less memory.

    cd RUN_FOLDER && python /path/to/bench/cap.py N      # one run, capped to N GiB
    bash bench/gpu.sh capped 40 24 16 12                 # in a scratch copy, one run per cap

The cap (torch.cuda.set_per_process_memory_fraction) makes the default micro-batch run
out of memory, so the run lowers it until step 0 fits (autoresearch/gpu.py's
fit_micro_batch): the log's `batch:` line shows the micro-batch chosen, the `overhead:`
line the seconds spent fitting, and the progress lines the tokens/s at it.
"""

import os
import runpy
import sys

# Before CUDA starts, as autoresearch/gpu.py sets it for train.py: the same allocator under the cap.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402


def main():
    try:
        gib = float(sys.argv[1]) if len(sys.argv) == 2 else None
    except ValueError:
        gib = None
    if gib is None or gib <= 0:
        sys.exit("usage: python cap.py N   (N: the GiB the run may allocate, > 0; run in the run folder)")
    if not os.path.isfile("train.py"):
        sys.exit(f"error: no train.py in {os.getcwd()}: run cap.py in the run folder")
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device: the cap is on GPU memory")
    total = torch.cuda.get_device_properties(0).total_memory
    if gib * 2**30 > total:
        sys.exit(f"error: {gib:g} GiB is more than this GPU's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total)
    sys.argv = ["train.py"]
    sys.path.insert(0, os.getcwd())  # run_path does not add the run folder: train.py imports prepare, autoresearch
    runpy.run_path("train.py", run_name="__main__")


if __name__ == "__main__":
    main()
