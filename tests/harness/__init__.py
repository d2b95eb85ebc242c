"""The iamlink end-to-end bench: a node network namespace with moto (IAM/STS), a fake upstream
metadata service serving a node role, iamlinkd, and pods made through the real CNI chain.

Used by scripts/demo and tests/e2e. Never touches the root network namespace.
"""

from .bench import Bench
from .daemon import Daemon
from .moto import ACCOUNT, Moto, role_arn
from .netns import Node
from .pods import CniError, Pod, Pods
from .upstream import NODE_ROLE, FakeUpstream
from .util import CNIRT, Fatal, IAMLINK_PLUGIN, PYTHON, IAMLINKD, REPO, Timeout, missing_binaries, wait_until

__all__ = ["ACCOUNT", "Bench", "CNIRT", "CniError", "Daemon", "Fatal", "FakeUpstream", "IAMLINKD", "IAMLINK_PLUGIN",
           "Moto", "NODE_ROLE", "PYTHON", "Node", "Pod", "Pods", "REPO", "Timeout", "missing_binaries", "role_arn",
           "wait_until"]
from .expect import assumed_role_re, credential_document_problems, is_assumed_role, parse_time, role_of_arn  # noqa: E402

__all__ += ["assumed_role_re", "credential_document_problems", "is_assumed_role", "parse_time", "role_of_arn"]
