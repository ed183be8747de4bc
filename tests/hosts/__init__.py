"""Tests on namespaced hosts: several "machines" on this one (tests/hosts/netns.py), for what
only separate hosts show: `ray up` over SSH, per-host Ray, real link cuts and host deaths.
Marked ``hosts``; run alone with ``scripts/test -m hosts``. They need root (namespaces, a
bridge) and skip with the reason when the machine cannot make namespaces."""
