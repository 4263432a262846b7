"""``python -m torchrun_rs ARGS``: runs ``torchrun-rs ARGS``."""

import os
import sys

from torchrun_rs import find_bin


def main():
    exe = find_bin()
    os.execv(exe, [exe, *sys.argv[1:]])


if __name__ == "__main__":
    main()
