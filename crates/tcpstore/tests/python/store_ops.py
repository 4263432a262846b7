"""Drives every Python-visible TCPStore operation against a server at HOST PORT
(ours or torch's) as a plain client, asserting torch's documented results.
Prints OK at the end."""
import sys
from datetime import timedelta

import torch.distributed as dist

host, port = sys.argv[1], int(sys.argv[2])
s = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
t = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))

s.set("k1", "v1")
assert s.get("k1") == b"v1"
assert t.get("k1") == b"v1", "second client sees the key"
assert s.add("cnt", 5) == 5
assert s.add("cnt", -2) == 3
assert s.get("cnt") == b"3"
assert s.compare_set("k1", "v1", "v2") == b"v2"
assert s.compare_set("k1", "nope", "v3") == b"v2"
assert s.compare_set("absent", "x", "y") == b"x"
assert not s.check(["absent"])
assert s.compare_set("absent", "", "y") == b"y"
assert s.check(["k1", "absent"])
assert not s.check(["k1", "nope"])
s.wait(["k1"])
s.wait(["k1"], timedelta(seconds=1))
try:
    s.wait(["never"], timedelta(milliseconds=300))
    raise AssertionError("wait on a missing key returned")
except Exception as e:  # DistStoreError in 2.15
    assert "timeout" in str(e).lower(), e
# The connection is usable after a timed-out wait.
assert s.get("k1") == b"v2"
n = s.num_keys()
assert n == 3, n  # k1, cnt, absent
assert s.delete_key("k1")
assert not s.delete_key("k1")
assert s.num_keys() == 2
s.append("a", "x")
s.append("a", "yz")
assert s.get("a") == b"xyz"
s.multi_set(["m1", "m2"], ["A", "BB"])
assert s.multi_get(["m1", "m2"]) == [b"A", b"BB"]
s.queue_push("q", "one")
s.queue_push("q", "two")
assert s.queue_len("q") == 2
assert s.queue_pop("q") == b"one"
assert t.queue_pop("q", block=False) == b"two"
assert s.queue_len("q") == 0
try:
    s.queue_pop("q", block=False)
    raise AssertionError("pop from an empty queue returned")
except Exception as e:
    assert "empty" in str(e).lower(), e
keys = sorted(s.list_keys())
assert keys == ["a", "absent", "cnt", "m1", "m2"], keys
# A wait released by another client's write.
import threading
def later():
    import time
    time.sleep(0.2)
    t.set("late", "1")
threading.Thread(target=later).start()
s.wait(["late"], timedelta(seconds=10))
# A blocking pop released by a push from another client.
threading.Thread(target=lambda: (__import__("time").sleep(0.2), t.queue_push("q2", "v"))).start()
assert s.queue_pop("q2") == b"v"
print("OK")
