"""Job lifecycle on a Ray cluster: submission through Ray's Job API, admission, records.

* :mod:`.submit` -- the user's side (``pipeline submit``, ``pipeline jobs ...``): talks only to
  the Job Submission API of the cluster's dashboard (``http://HEAD:8265``); the job's code and
  resolved spec travel in its ``runtime_env``.
* :mod:`.queue` -- the admission policy: priority, then first come first served, at most
  ``max_running`` jobs at once; a running job that stops sending heartbeats gives its slot back.
* :mod:`.actor` -- the coordinator itself: one detached, named Ray actor on the head node that
  holds the queue and every job's record, and keeps a JSON snapshot of them so a restarted
  coordinator (or cluster operator) finds them again.
* :mod:`.driver` -- what a job's driver does: wait for admission, send heartbeats with its
  progress, record its final state.
"""
