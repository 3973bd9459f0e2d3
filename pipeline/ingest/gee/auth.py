"""Earth Engine credentials for unattended runs: checked statically, initialised lazily.

Credentials come from the environment only: a service-account key file
(``GOOGLE_APPLICATION_CREDENTIALS``) or application default credentials (the gcloud ADC file,
or a service account attached to the machine), and a Cloud project registered for Earth Engine
(the site's ``gee.project``, else ``EE_PROJECT``, else ``GOOGLE_CLOUD_PROJECT``). Nothing here
prints, logs or returns secret material: only the key file's path and its service account's
e-mail. User refresh tokens expire (``invalid_grant``) and are reported as unfit for cron.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cropmap.pipeline.errors import AuthError

SCOPES = ["https://www.googleapis.com/auth/earthengine", "https://www.googleapis.com/auth/cloud-platform"]
WORKLOAD_TAG = "cropmap-ingest"
KEY_FIX = ("set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file of a project registered for Earth Engine "
           "(or use application default credentials: `gcloud auth application-default login`, or a service account attached to the machine)")


@dataclass
class AuthStatus:
    project: str | None = None
    project_from: str = ""
    credentials: str = ""
    """What will authenticate (a path and an e-mail, never a secret)."""
    key_file: Path | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        out = [f"project:     {self.project} (from {self.project_from})" if self.project else "project:     MISSING",
               f"credentials: {self.credentials or 'MISSING'}"]
        return out + [f"note: {n}" for n in self.notes] + [f"missing: {p}" for p in self.problems]


def adc_file(env: Mapping[str, str]) -> Path:
    root = env.get("CLOUDSDK_CONFIG") or str(Path(env.get("HOME", "~")).expanduser() / ".config" / "gcloud")
    return Path(root) / "application_default_credentials.json"


def _describe_key(path: Path, status: AuthStatus) -> None:
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        status.problems.append(f"credentials file {str(path)!r} cannot be read ({exc.strerror}); {KEY_FIX}")
        return
    except json.JSONDecodeError:
        status.problems.append(f"credentials file {str(path)!r} is not JSON; {KEY_FIX}")
        return
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "service_account":
        if not doc.get("client_email") or not doc.get("private_key"):
            status.problems.append(f"service-account key {str(path)!r} lacks client_email or private_key; download a new key")
            return
        status.credentials, status.key_file = f"service account {doc['client_email']} (key file {path})", path
    elif kind == "authorized_user":
        status.credentials = f"user credentials (file {path})"
        status.notes.append("user refresh tokens expire (invalid_grant): use a service account for unattended yearly runs")
    elif kind == "external_account":
        status.credentials = f"workload identity federation (file {path})"
    else:
        status.problems.append(f"credentials file {str(path)!r} has type {kind!r}; {KEY_FIX}")


def check_auth(project: str | None = None, env: Mapping[str, str] | None = None) -> AuthStatus:
    """What is set up for Earth Engine and what is missing, without contacting any server."""
    env = os.environ if env is None else env
    status = AuthStatus()
    for source, value in (("site gee.project", project), ("EE_PROJECT", env.get("EE_PROJECT")),
                          ("GOOGLE_CLOUD_PROJECT", env.get("GOOGLE_CLOUD_PROJECT"))):
        if value:
            status.project, status.project_from = value, source
            break
    else:
        status.problems.append("no Cloud project: set EE_PROJECT (or gee.project in the site file) to a project registered for Earth Engine")
    key = env.get("GOOGLE_APPLICATION_CREDENTIALS")
    if key:
        path = Path(key).expanduser()
        if not path.is_file():
            status.problems.append(f"GOOGLE_APPLICATION_CREDENTIALS points to {str(path)!r}, which does not exist; {KEY_FIX}")
        else:
            _describe_key(path, status)
    elif adc_file(env).is_file():
        _describe_key(adc_file(env), status)
        status.credentials = status.credentials.replace("(file", "(application default credentials,")
    elif env.get("CROPMAP_EE_METADATA_CREDENTIALS") == "1":
        status.credentials = "service account attached to this machine (metadata server)"
    else:
        status.problems.append(f"no credentials found; {KEY_FIX}")
    return status


def require_auth(project: str | None = None) -> AuthStatus:
    """:func:`check_auth`, raising one :class:`AuthError` line naming everything missing."""
    status = check_auth(project)
    if not status.ok:
        raise AuthError("Earth Engine is not set up: " + "; ".join(status.problems),
                        fix="run `cropmap auth check` after fixing it")
    return status


def load_credentials(status: AuthStatus):
    """Google credentials for ``status`` (key file, else application default credentials)."""
    if status.key_file is not None:
        from google.oauth2 import service_account

        return service_account.Credentials.from_service_account_file(str(status.key_file), scopes=SCOPES)
    import google.auth

    creds, _ = google.auth.default(scopes=SCOPES)
    return creds


def initialize(status: AuthStatus) -> None:
    """``ee.Initialize`` with the checked credentials and project, tagged as cropmap work."""
    import ee

    try:
        ee.Initialize(load_credentials(status), project=status.project)
    except Exception as exc:  # google-auth and ee raise many kinds; the message never holds the key
        raise AuthError(f"Earth Engine refused to initialise for project {status.project!r}: {type(exc).__name__}: {exc}",
                        fix="check that the project is registered for Earth Engine and the service account has access") from None
    ee.data.setWorkloadTag(WORKLOAD_TAG)
