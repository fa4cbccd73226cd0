"""Running a comparison's runs on many workers: who runs what, on which devices, and what each is doing.

claims.py   the lock over the queue, one claim file per run in progress, and when a claim is stale
devices.py  how the visible GPUs (or CPU cores) are shared out among the workers of one machine

The queue itself (which runs exist, which are done, which may start) and the worker loop are the
command-level module toolkit/workers.py, which compare.py starts. This subpackage imports core only and
runs nothing: it may be imported by the commands and by report, never by the layers below it.
"""
