"""``python -m torchrun_rs ARGS``: runs ``torchrun-rs ARGS``, with workers on
this Python (``sys.executable``), as ``python -m torch.distributed.run``
does; an explicit ``PYTHON_EXEC`` still wins."""

import os
import sys

from torchrun_rs import find_bin


def main():
    exe = find_bin()
    if not os.environ.get("PYTHON_EXEC") and sys.executable:
        os.environ["PYTHON_EXEC"] = sys.executable
    os.execv(exe, [exe, *sys.argv[1:]])


if __name__ == "__main__":
    main()
