"""What a right answer looks like, for the tests and the demo."""

import datetime
import re

from .moto import ACCOUNT

CREDENTIAL_FIELDS = ("Code", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration", "LastUpdated")
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def assumed_role_re(role):
    return re.compile(rf"^arn:aws:sts::{ACCOUNT}:assumed-role/{re.escape(role)}/[\w+=,.@-]{{2,64}}$")


def is_assumed_role(arn, role):
    return bool(arn) and bool(assumed_role_re(role).match(arn.strip()))


def role_of_arn(arn):
    """'web' for arn:aws:sts::123456789012:assumed-role/web/session, else None."""
    m = re.match(r"^arn:aws:sts::\d{12}:assumed-role/([^/]+)/", arn or "")
    return m.group(1) if m else None


def parse_time(s):
    return datetime.datetime.strptime(s.split(".")[0].rstrip("Z"), "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc)


def credential_document_problems(doc):
    """Why `doc` is not an IMDS credentials document (empty list when it is one)."""
    problems = [f"missing {k}" for k in CREDENTIAL_FIELDS if not doc.get(k)]
    if doc.get("Code") and doc["Code"] != "Success":
        problems.append(f"Code={doc['Code']!r}")
    if doc.get("Type") and doc["Type"] != "AWS-HMAC":
        problems.append(f"Type={doc['Type']!r}")
    for k in ("Expiration", "LastUpdated"):
        if doc.get(k) and not RFC3339_UTC.match(doc[k]):
            problems.append(f"{k}={doc[k]!r} is not RFC 3339 UTC")
    if doc.get("Expiration") and RFC3339_UTC.match(doc["Expiration"]):
        if parse_time(doc["Expiration"]) <= datetime.datetime.now(datetime.timezone.utc):
            problems.append(f"expired: Expiration={doc['Expiration']}")
    return problems
