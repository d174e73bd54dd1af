"""What a new user meets in the first hour: the repository is self-contained and its docs tell the truth.

* every citation of the reference notes points at a file inside the repository (a fresh clone with
  nothing beside it must pass the suite);
* the CPU speed figures have one source of truth (docs/benchmarks.md);
* scripts/setup.sh says which torch it installs and offers a CPU-only index;
* the Slicer catalog entry points at files that exist.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".json", ".sh", ".txt", ".toml", ".cfg", ".ui"}


def _tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=30,
                             check=True).stdout.split()
        files = [REPO / f for f in out]
    except (OSError, subprocess.SubprocessError):  # not a git checkout (e.g. an sdist): walk the tree
        files = [p for p in REPO.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    this = Path(__file__).resolve()
    return [f for f in files if f.is_file() and f.resolve() != this
            and (f.suffix in TEXT_SUFFIXES or f.name == "CMakeLists.txt")]


# ------------------------------------------------------------------------------- self-contained (item 3)
def test_no_file_cites_the_reference_folder_outside_the_repository():
    offenders = []
    for f in _tracked_text_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        for n, line in enumerate(text.splitlines(), 1):
            if re.search(r"shared/reference|\.\./shared|parents\[1\]\.parent", line):
                offenders.append(f"{f.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not offenders, "files cite paths outside the repository:\n" + "\n".join(offenders)


def test_every_citation_of_the_reference_notes_names_the_copy_in_the_repository():
    notes = REPO / "docs" / "reference" / "SAM_MED3D.md"
    assert notes.is_file()
    assert (REPO / "Testing" / "data" / "sam_med3d_vit_b_ori.manifest.json").is_file()
    sections = set(re.findall(r"^## (\d+)\.", notes.read_text(encoding="utf-8"), flags=re.M))
    bad = []
    for f in _tracked_text_files():
        if f == notes:
            continue
        for n, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if "SAM_MED3D.md" not in line:
                continue
            if "docs/reference/SAM_MED3D.md" not in line:
                bad.append(f"{f.relative_to(REPO)}:{n}: cites SAM_MED3D.md without its path in the repository")
            for sec in re.findall(r"SAM_MED3D\.md\S*\s*(?:section|§)\s*(\d+)", line):
                if sec not in sections:
                    bad.append(f"{f.relative_to(REPO)}:{n}: SAM_MED3D.md has no section {sec}")
    assert not bad, bad


def test_evaluation_summary_note_cites_a_file_in_the_repository():
    import SAM3DSegmentLib.eval.report as ev

    src = Path(ev.__file__).read_text(encoding="utf-8")
    cited = re.findall(r"(docs/[\w/]+\.md)", src)
    assert cited, "report.py's summary note no longer cites the reference notes"
    for c in cited:
        assert (REPO / c).is_file(), c


# ------------------------------------------------------------------------------------ CPU speed (item 9)
def _benchmark_summary():
    text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    section = text.split("## Summary: the CPU figures quoted elsewhere", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[1] and not set(cells[1]) <= {"-"}:
            rows[cells[0]] = cells[1]
    return rows


def test_cpu_speed_figures_have_one_source_the_benchmarks_summary():
    from SAM3DSegmentLib.cli import diagnose

    rows = _benchmark_summary()
    encode = rows["encode one 128³ region (once per region: the first click in it)"]
    later = rows["later click inside encoded regions (prompt + decoder + paste), median per region"]
    assert diagnose.CPU_ENCODE_SECONDS == encode and diagnose.CPU_LATER_CLICK == later
    assert encode in diagnose.CPU_WARNING and later in diagnose.CPU_WARNING
    assert "docs/benchmarks.md" in diagnose.CPU_WARNING
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    slicer = (REPO / "docs" / "slicer.md").read_text(encoding="utf-8")
    for doc, link in ((readme, "(docs/benchmarks.md)"), (slicer, "(benchmarks.md)")):
        assert link in doc and encode in doc and later in doc
    # the contradicting claims that used to be there
    assert "later clicks about a second" not in slicer and "take many seconds" not in slicer
    assert "seconds instead of milliseconds" not in diagnose.CPU_WARNING
    assert "in tens of\nmilliseconds" not in readme


# ------------------------------------------------------------------------------- setup.sh (item 10)
def _run_setup(tmp_path, **env):
    """scripts/setup.sh against a stand-in venv whose python records every call (no network, no pip)."""
    import os
    import shutil

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    log = tmp_path / "calls.log"
    fake = repo / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\ncat > /dev/null 2>&1 || true\nexit 0\n')
    fake.chmod(0o755)
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHON": str(fake), **env}
    res = subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], cwd=repo, env=full_env,
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    calls = [ln for ln in log.read_text(encoding="utf-8").splitlines() if " install " in f" {ln} "]
    return res.stdout, calls


def test_setup_offers_a_cpu_only_torch_index_and_keeps_the_local_wheel_folder(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    out, calls = _run_setup(tmp_path, TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu", WHEELS=str(wheels))
    torch_call = next(c for c in calls if "torch==2.13.0" in c)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_call
    assert f"--find-links {wheels}" in torch_call
    pkg_call = next(c for c in calls if "-e .[test]" in c)
    assert "--index-url" not in pkg_call and f"--find-links {wheels}" in pkg_call
    # the default: the package index, and the script says that this is the CUDA build on Linux x86-64
    out, calls = _run_setup(tmp_path / "b", WHEELS=str(tmp_path / "no_such_folder"))
    torch_call = next(c for c in calls if "torch==2.13.0" in c)
    assert "--index-url" not in torch_call and "--find-links" not in torch_call
    assert "CUDA build" in out and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in out
    text = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert "pinned CPU torch" not in text
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "pinned CPU torch" not in readme and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in readme


# --------------------------------------------------------------------------- catalog entry (item 11)
def test_catalog_icon_and_screenshot_urls_point_at_files_in_the_repository():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    prefix = "https://raw.githubusercontent.com/SAM3DSegment/SAM3DSegment/main/"
    urls = {k: v for k, v in re.findall(r'set\((EXTENSION_(?:ICONURL|SCREENSHOTURLS))\s+"([^"]+)"\)', text)}
    assert set(urls) == {"EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"}
    for key, value in urls.items():
        for url in value.split():
            assert url.startswith(prefix), url
            f = REPO / url[len(prefix):]
            assert f.is_file(), f"{key}: {f} does not exist"
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
            assert f.parts[-2] == "Resources"
    notes = (REPO / "Resources" / "README.md").read_text(encoding="utf-8")
    assert "not a screenshot of 3D Slicer" in notes and "demo model" in notes


def test_evaluation_doc_says_bfloat16_runs_on_the_cpu():
    text = (REPO / "docs" / "evaluation.md").read_text(encoding="utf-8")
    assert "half precisions on a GPU only" not in text
    assert "`bfloat16` (GPU and CPU" in text and "`float16` (GPU only)" in text
