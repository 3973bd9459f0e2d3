"""Scheduling yearly reruns with the tools users already run: cron, a systemd timer, a Kubernetes CronJob.

Every entry runs ``cropmap run --site SITE --year auto --out OUT``: the latest year whose inputs
and labels are available (:mod:`.availability`). A rerun with nothing new does nothing (versioned
runs, :mod:`.versions`), so the schedule can be frequent (weekly by default) and a new season is
mapped soon after its data and labels appear. ``cropmap run`` exits 75 when no year is available
yet ("try later"), 0 when done or up to date, 2 on an error a user must fix.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from cropmap.pipeline.errors import CropmapError

DEFAULT_AT = "0 6 * * 1"  # Mondays 06:00
KINDS = ("cron", "systemd", "kubernetes")
PASSED_ENV = ("CROPMAP_SITES_DIR", "CROPMAP_DATA_ROOT", "EE_PROJECT", "GOOGLE_APPLICATION_CREDENTIALS", "GDAL_CACHEMAX")
"""Settings carried into the scheduled environment. Only *paths* to credentials (a key file), never secrets themselves."""
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_DOW = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def parse_cron(expr: str) -> list[str]:
    """The five fields of a cron expression, validated (numbers, ``*``, ``a-b``, ``/n`` steps, lists)."""
    fields = expr.split()
    if len(fields) != 5:
        raise CropmapError(f"--at {expr!r} is not a cron expression of 5 fields", fix="use 'MIN HOUR DOM MON DOW', e.g. --at '0 6 * * 1'")
    for text, (name, lo, hi) in zip(fields, _FIELDS):
        for part in text.split(","):
            m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            nums = [int(g) for g in (m.group(2), m.group(3)) if g is not None] if m else []
            if not m or any(not lo <= n <= hi for n in nums) or (len(nums) == 2 and nums[0] > nums[1]) or (m.group(4) is not None and int(m.group(4)) == 0):
                raise CropmapError(f"--at {expr!r}: {name} field {text!r} is not valid ({lo}-{hi}, '*', 'a-b', '*/n' or lists)",
                                   fix="e.g. --at '0 6 * * 1' (Mondays 06:00)")
    return fields


def _systemd_field(text: str, dow: bool = False, lo: int = 0) -> str:
    parts = []
    for part in text.split(","):
        m = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
        a, b, step = m.group(2), m.group(3), m.group(4)
        if dow:
            if a is None:
                return ""
            if step:
                raise CropmapError(f"day-of-week steps ({part!r}) have no systemd equivalent", fix="list the days, e.g. 1,3,5")
            parts.append(f"{_DOW[int(a)]}..{_DOW[int(b)]}" if b else _DOW[int(a)])
            continue
        if a is None:
            parts.append(f"{lo:02d}/{step}" if step else "*")
        else:
            base = f"{int(a):02d}..{int(b):02d}" if b else f"{int(a):02d}"
            parts.append(f"{int(a):02d}/{step}" if step and not b else base if not step else f"{base}/{step}")
    return ",".join(parts)


def on_calendar(expr: str) -> str:
    """The systemd ``OnCalendar=`` of a cron expression."""
    minute, hour, dom, month, dow = parse_cron(expr)
    date = f"*-{_systemd_field(month, lo=1)}-{_systemd_field(dom, lo=1)}"
    days = _systemd_field(dow, dow=True)
    return f"{days + ' ' if days else ''}{date} {_systemd_field(hour)}:{_systemd_field(minute)}:00"


def run_command(site: str, out: Path, exe: str | None = None) -> list[str]:
    """The scheduled command line."""
    exe = exe or shutil.which("cropmap") or f"{sys.executable} -m cropmap.pipeline.cli"
    return [*shlex.split(exe), "run", "--site", site, "--year", "auto", "--out", str(Path(out).resolve())]


def _env(env: dict[str, str] | None) -> dict[str, str]:
    env = os.environ if env is None else env
    return {k: env[k] for k in PASSED_ENV if env.get(k)}


def tag(site: str) -> str:
    return f"# cropmap:{site}"


def cron_entry(site: str, at: str, out: Path, exe: str | None = None, env: dict[str, str] | None = None) -> str:
    """One crontab line (logs to OUT/SITE/schedule.log)."""
    parse_cron(at)
    log = Path(out).resolve() / site / "schedule.log"
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in _env(env).items())
    cmd = " ".join(shlex.quote(a) for a in run_command(site, out, exe))
    return f"{at} mkdir -p {shlex.quote(str(log.parent))} && {assigns + ' ' if assigns else ''}{cmd} >> {shlex.quote(str(log))} 2>&1 {tag(site)}"


def systemd_units(site: str, at: str, out: Path, exe: str | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    """``cropmap-SITE.service`` and ``cropmap-SITE.timer`` (user units)."""
    cal = on_calendar(at)
    envs = "".join(f'Environment="{k}={v}"\n' for k, v in _env(env).items())
    cmd = " ".join(shlex.quote(a) for a in run_command(site, out, exe))
    service = (f"[Unit]\nDescription=cropmap yearly run of site {site} (--year auto)\n\n[Service]\nType=oneshot\n{envs}"
               f"ExecStart={cmd}\n# 75 = no year available yet: not a failure\nSuccessExitStatus=75\n")
    timer = (f"[Unit]\nDescription=Schedule of cropmap-{site}.service (cron '{at}')\n\n[Timer]\nOnCalendar={cal}\nPersistent=true\n"
             f"RandomizedDelaySec=10m\n\n[Install]\nWantedBy=timers.target\n")
    return {f"cropmap-{site}.service": service, f"cropmap-{site}.timer": timer}


def kubernetes_cronjob(site: str, at: str, image: str = "cropmap:latest", claim: str = "cropmap-runs") -> str:
    """A CronJob manifest running the Docker image (runs on a PersistentVolumeClaim mounted at /runs)."""
    parse_cron(at)
    return f"""apiVersion: batch/v1
kind: CronJob
metadata:
  name: cropmap-{site}
spec:
  schedule: "{at}"
  concurrencyPolicy: Forbid        # the run lock also refuses a second run of the same site and year
  jobTemplate:
    spec:
      backoffLimit: 0
      podFailurePolicy:
        rules:
          - action: Ignore         # exit 75: no year available yet, try at the next schedule
            onExitCodes: {{operator: In, values: [75]}}
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: cropmap
              image: {image}
              args: [run, --site, {site}, --year, auto, --out, /runs]
              envFrom:
                - secretRef: {{name: cropmap-gee, optional: true}}   # GOOGLE_APPLICATION_CREDENTIALS path, EE_PROJECT
              volumeMounts:
                - {{name: runs, mountPath: /runs}}
          volumes:
            - name: runs
              persistentVolumeClaim: {{claimName: {claim}}}
"""


Runner = Callable[..., subprocess.CompletedProcess]


def install_cron(entry: str, site: str, run: Runner = subprocess.run) -> str:
    """Add (or replace) the site's line in the user's crontab; returns the new crontab."""
    try:
        cur = run(["crontab", "-l"], capture_output=True, text=True)
    except FileNotFoundError:
        raise CropmapError("no `crontab` command on this machine", fix="use --kind systemd, or --print and add the line by hand") from None
    lines = cur.stdout.splitlines() if cur.returncode == 0 else []
    lines = [line for line in lines if not line.rstrip().endswith(tag(site))] + [entry]
    new = "\n".join(lines) + "\n"
    done = run(["crontab", "-"], input=new, capture_output=True, text=True)
    if done.returncode != 0:
        raise CropmapError(f"crontab refused the entry: {done.stderr.strip()}", fix="check `crontab -l`, or use --print")
    return new


def install_systemd(units: dict[str, str], site: str, unit_dir: Path | None = None, run: Runner = subprocess.run) -> list[str]:
    """Write the user units and enable the timer; returns what was done."""
    unit_dir = Path(unit_dir or Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "systemd" / "user")
    from cropmap.pipeline.fsio import ensure_writable_dir, write_text

    ensure_writable_dir(unit_dir)
    done = []
    for name, text in units.items():
        write_text(unit_dir / name, text)
        done.append(f"wrote {unit_dir / name}")
    for args in (["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", f"cropmap-{site}.timer"]):
        try:
            proc = run(args, capture_output=True, text=True)
        except FileNotFoundError:
            done.append(f"no systemctl here: run `{' '.join(args)}` where systemd runs")
            break
        if proc.returncode != 0:
            raise CropmapError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}", fix="check `systemctl --user status`, or use --kind cron")
        done.append("ran " + " ".join(args))
    return done
