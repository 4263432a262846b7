"""torch 2.15's own --numa-binding algorithm (torch/numa/binding.py) run on
a fake machine: numa_reference.py ROOT MODE NPROC prints, as JSON, the CPUs
torch binds each local rank to, or the error it raises.
numa_reference.py ROOT MODE NPROC [MODE NPROC ...] answers several at once,
keyed "MODE NPROC".

torch reads absolute /sys paths and asks CUDA for each device's PCI address;
here /sys reads go below ROOT, the devices are the NVIDIA PCI functions
under ROOT (in address order, as CUDA orders identical GPUs), and the CPUs
this process may use are the fake machine's online CPUs. Everything else is
torch's code, unchanged.
"""
import builtins
import json
import os
import sys

import torch.numa.binding as b

root = sys.argv[1]
asked = [(sys.argv[i], int(sys.argv[i + 1])) for i in range(2, len(sys.argv), 2)]


def redirect(path):
    path = os.fspath(path)
    return root + path if path.startswith("/sys/") else path


real_open, real_listdir = builtins.open, os.listdir
builtins.open = lambda path, *a, **k: real_open(redirect(path), *a, **k)
os.listdir = lambda path: real_listdir(redirect(path))

pci = os.path.join(root, "sys/bus/pci/devices")
gpus = sorted(
    d for d in real_listdir(pci)
    if real_open(os.path.join(pci, d, "vendor")).read().strip() == "0x10de"
    and real_open(os.path.join(pci, d, "class")).read().strip()[:6] in ("0x0300", "0x0302")
)


def numa_node_of_device(*, device_index):
    # torch: the device's PCI address from CUDA, then the same read.
    with open(f"/sys/bus/pci/devices/{gpus[device_index]}/numa_node") as f:
        return max(int(f.read().strip()), 0)


b._get_device_count = lambda: len(gpus)
b._get_numa_node_index_for_device_index = numa_node_of_device
with open("/sys/devices/system/cpu/online") as f:
    online = b._get_set_of_int_from_ranges_str(f.read())
b._get_allowed_cpu_indices_for_current_thread = lambda: set(online)



def bind(mode, nproc):
    out = {}
    for d in range(nproc):
        try:
            cpus = b._get_logical_cpus_to_bind_to(
                device_index=d, numa_options=b.NumaOptions(affinity_mode=b.AffinityMode(mode))
            )
            if not cpus:
                raise RuntimeError("Must bind to a non-empty set of CPU indices")
            out[d] = sorted(cpus)
        except Exception as e:  # noqa: BLE001 - the reference's failure is data
            out[d] = f"error: {e}"
    return out


print(json.dumps({f"{mode} {nproc}": bind(mode, nproc) for mode, nproc in asked}))
