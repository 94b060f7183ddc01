#!/usr/bin/env python3
"""The seam between our code and vLLM, checked from the sources (no import, seconds):

- every replacement of a vLLM attribute lives in infinitevl_vllm/vllm_patches.py: anywhere else in
  infinitevl_vllm/ or kernels/, a ``setattr`` / ``_patch_once`` / ``patch.object`` call or an assignment to an
  attribute of a name imported from vllm is a finding;
- no import cycle inside the packages (every import counts, lazy ones inside functions too);
- the ring attention module imports nothing from the sessions feature;
- tests/ and benchmarks/ do not import each other (they share helpers through infinitevl_vllm.tools.workloads).

    python scripts/check_seam.py [ROOT]     # exit 1 and one line per finding
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

PACKAGE_DIRS = ("infinitevl_vllm", "kernels")
SEAM = Path("infinitevl_vllm") / "vllm_patches.py"
PATCH_CALLS = ("setattr", "_patch_once", "patch_once")


def module_name(path: Path) -> str:
    parts = list(path.with_suffix("").parts)
    if parts[0] == "kernels":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _import_targets(node: ast.AST, mod: str, is_init: bool) -> tuple[list[str], list[ast.alias]]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names], node.names
    base = node.module
    if node.level:
        parts = mod.split(".")
        pkg = parts if is_init else parts[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    names = [a.name for a in node.names]
    return [base] + [f"{base}.{n}" for n in names], node.names


def scan(root: Path) -> list[str]:
    files = [p.relative_to(root) for d in PACKAGE_DIRS for p in (root / d).rglob("*.py")]
    if not files:
        return ["no package sources"]
    findings = []
    if not (root / SEAM).exists():
        findings.append(f"no {SEAM}")
    mods = {module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse((root / path).read_text())
        vllm_names: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets, aliases = _import_targets(node, mod, path.name == "__init__.py")
            for t in targets:
                if t and t.startswith("vllm"):
                    vllm_names |= {a.asname or a.name.split(".")[0] for a in aliases}
                if t in mods and t != mod:
                    graph[mod].add(t)
        if path == SEAM:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                patch_object = name == "object" and getattr(getattr(f, "value", None), "id", "") == "patch"
                if name in PATCH_CALLS or patch_object:
                    findings.append(f"{path}:{node.lineno}: {name}() outside {SEAM}")
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    base = t
                    while isinstance(base, ast.Attribute):
                        base = base.value
                    if t is not base and isinstance(base, ast.Name) and base.id in vllm_names:
                        findings.append(f"{path}:{node.lineno}: assigns an attribute of vLLM's {base.id}")
    findings += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    for mod, path in mods.items():
        sessions = r"^\s*(from|import)\s+\S*(session|serving)"
        if mod.endswith("ring_attention") and re.search(sessions, (root / path).read_text(), re.M):
            findings.append(f"{path} imports the sessions feature")
    for d, other in (("tests", "benchmarks"), ("benchmarks", "tests")):
        for p in sorted((root / d).rglob("*.py")):
            if re.search(rf"sys\.path.*{other}|^\s*(from|import)\s+{other}\b", p.read_text(), re.M):
                findings.append(f"{p.relative_to(root)} imports from {other}/")
    return findings


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    seen: set[str] = set()
    stack: list[str] = []
    found = []

    def dfs(u: str) -> None:
        seen.add(u)
        stack.append(u)
        for v in sorted(graph[u]):
            if v in stack:
                found.append(stack[stack.index(v):] + [v])
            elif v not in seen:
                dfs(v)
        stack.pop()

    for m in sorted(graph):
        if m not in seen:
            dfs(m)
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else Path(__file__).resolve().parents[1])
    findings = scan(root)
    for f in findings:
        print(f"check_seam: {f}")
    if not findings:
        print("check_seam: vLLM patches only in infinitevl_vllm/vllm_patches.py, no import cycles, "
              "ring attention free of sessions, tests and benchmarks apart")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
