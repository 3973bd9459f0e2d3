"""Test helper (never imported by cropmap): run ``cropmap`` and SIGKILL the process in the middle of one stage.

``python faultrun.py STAGE cropmap-args...``: while STAGE runs, the process kills itself at the
first file it is about to move into place (its temporary output complete, the final name not yet
written), or at the end of the stage if it writes none: the worst moment for a crash.
"""

import os
import signal
import sys

from cropmap.pipeline import cli, runner

target = sys.argv[1]
sys.argv = ["cropmap", *sys.argv[2:]]
real_replace, real_run = os.replace, runner.Runner.run
state = {"in": False}


def replace(src, dst, *a, **kw):
    if state["in"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **kw)


def run(self, stages, outputs):
    for st in stages:
        if st.name == target:
            inner = st.run

            def wrapped(ctx, inner=inner):
                state["in"] = True
                out = inner(ctx)
                os.kill(os.getpid(), signal.SIGKILL)
                return out

            st.run = wrapped
    return real_run(self, stages, outputs)


os.replace = replace
runner.Runner.run = run
cli.main()
