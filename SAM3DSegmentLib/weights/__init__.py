"""Named model weights: a registry of known checkpoints, a per-user cache, and a resumable download.

Nothing here imports torch: this package only finds, fetches and checks files.

* :mod:`.registry`: :data:`REGISTRY` maps short names (``"sam-med3d-turbo"``, ``"sam-med3d"``, ``"demo"``) to
  :class:`ModelWeights` records: file name, URL, expected size and sha256 where published, architecture,
  licence and a one-line description.
* :mod:`.cache`: :func:`cache_dir` is where downloaded files live (``$SAM3D_HOME`` overrides the platform
  default from platformdirs); checkpoints go to ``cache_dir() / "checkpoints"``. :func:`cache_state` and
  :func:`list_cache` say what is there; :func:`offline_help` says what to do without a network.
* :mod:`.resolve`: :func:`resolve_checkpoint` turns a name or a path into a local file, downloading on first
  use; :func:`repair` deletes a cached copy that fails its checks and fetches it again.
* :mod:`.fetch`: :func:`download` streams a URL into ``dest + ".part"`` with ``urllib``, resumes an interrupted
  transfer with an HTTP ``Range`` request, checks size, sha256 and content, and renames the finished file into
  place atomically; :mod:`.lock` (filelock) keeps two processes or threads from writing the same file at once,
  and :mod:`.transport` bounds the transfer (a socket timeout per read, a stall detector, an overall
  deadline). A stopped transfer keeps its ``.part`` for resuming; a full disk or read-only cache ends in
  one line naming the folder and the fix, and the unfinished ``.part`` is deleted.
* :mod:`.verify`: a published sha256 is always enforced; a file without one must look like a
  SAM-Med3D-family checkpoint before the sha256 of its first download is recorded next to it (trust on
  first use) and checked on every later load.
* :mod:`.progress`: the tqdm progress bar; :mod:`.errors`: :class:`WeightsError`, :class:`ChecksumError`.

The transfer is our own code on ``urllib`` rather than huggingface_hub's or pooch's download: neither stops a
server that trickles bytes (no stall detector, no overall deadline; their timeouts bound single reads only),
pooch does not resume a partial file, and huggingface_hub only talks to Hub-compatible endpoints (it refuses a
plain file server without the Hub's ``X-Repo-Commit`` header, so ``$SAM3D_WEIGHTS_BASE_URL`` mirrors and the
loopback tests would break) and puts a file in place before our content check could refuse it.

Registered names always mean the cache: a file called ``sam-med3d`` in the current folder is not picked
up in its place.

Environment:

``SAM3D_HOME``
    cache directory (the checkpoints live in its ``checkpoints/`` sub-folder).
``SAM3D_WEIGHTS_BASE_URL``
    mirror for the registered files: ``<base>/<file name>`` is fetched instead of the published URL
    (offline sites, tests).
"""
from __future__ import annotations

from .cache import (APP_DIR_NAME, ENV_HOME, cache_dir, cache_state, cached_path, checkpoint_dir, list_cache,
                    offline_help)
from .errors import ChecksumError, WeightsError
from .fetch import DownloadResult, download
from .lock import DownloadLock
from .progress import ProgressArg, ProgressCallback, TextProgress
from .registry import (DEFAULT_MODEL, ENV_BASE_URL, HF_BASE_URL, HF_REPO, REGISTRY, ModelWeights, get_weights,
                       iter_registry, known_names, register_weights)
from .resolve import repair, resolve_checkpoint
from .transport import DEFAULT_MIN_RATE, DEFAULT_STALL_WINDOW
from .verify import (SIDECAR_SUFFIX, checksum_status, payload_problem, repair_command, sha256_file, sidecar_path,
                     verify_cached)

__all__ = [
    "APP_DIR_NAME", "ChecksumError", "DEFAULT_MIN_RATE", "DEFAULT_MODEL", "DEFAULT_STALL_WINDOW", "DownloadLock",
    "DownloadResult", "ENV_BASE_URL", "ENV_HOME", "HF_BASE_URL", "HF_REPO", "ModelWeights", "ProgressArg",
    "ProgressCallback", "REGISTRY", "SIDECAR_SUFFIX", "TextProgress", "WeightsError", "cache_dir", "cache_state",
    "cached_path", "checkpoint_dir", "checksum_status", "download", "get_weights", "iter_registry", "known_names",
    "list_cache", "offline_help", "payload_problem", "register_weights", "repair", "repair_command",
    "resolve_checkpoint", "sha256_file", "sidecar_path", "verify_cached",
]
