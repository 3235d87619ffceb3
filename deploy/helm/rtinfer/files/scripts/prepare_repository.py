"""Init container of the Triton pods: the served model repository, with the chart's model parameters.

    python3 prepare_repository.py SRC DST PARAMETERS_JSON

DST (an emptyDir) becomes the repository Triton serves: every model of SRC is a symlink to it,
except the models PARAMETERS_JSON ({model: {parameter: value}}) names, whose config.pbtxt and
configs/*.pbtxt are rewritten with those string parameters (every other file still a symlink).
A parameter that is not in a config exactly once, a model that is not in SRC or a value that
cannot be written into a pbtxt string stops the pod: a setting the stages never see must not pass
for one they use. The same rewrite as rtinfer.launch.server.repository_with (the tests compare the two),
without importing rtinfer (the NGC image's Python has the stages' dependencies, not the launcher's).
"""
import json
import re
import shutil
import sys
from pathlib import Path


def rewrite(text: str, overrides: dict, where: str) -> str:
    for key, value in overrides.items():
        if not isinstance(value, str) or any(c in value for c in '"\\\n\r'):
            raise ValueError(f"{where}: parameter {key} must be a string without quotes, backslashes or newlines")
        pattern = re.compile(r'(\{ key: "%s" value: \{ string_value: ")[^"]*(" \} \})' % re.escape(key))
        text, n = pattern.subn(lambda m: m.group(1) + value + m.group(2), text)
        if n != 1:
            raise ValueError(f"{where}: parameter {key} found {n} times, not once")
    return text


def prepare(src: Path, dst: Path, params: dict) -> list[str]:
    src = src.resolve()
    missing = sorted(set(params) - {p.name for p in src.iterdir() if p.is_dir()})
    if missing:
        raise ValueError(f"model parameters name models that {src} does not have: {', '.join(missing)}")
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.iterdir():  # a restarted pod reruns this on the same emptyDir
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    changed = []
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.name not in params:
            target.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
            continue
        target.mkdir()
        for child in sorted(entry.iterdir()):
            if child.name == "config.pbtxt":
                (target / child.name).write_text(rewrite(child.read_text(), params[entry.name], str(child)))
                changed.append(f"{entry.name}/{child.name}")
            elif child.name == "configs" and child.is_dir():
                (target / "configs").mkdir()
                for cfg in sorted(child.iterdir()):
                    if cfg.suffix == ".pbtxt":
                        rewritten = rewrite(cfg.read_text(), params[entry.name], str(cfg))
                        (target / "configs" / cfg.name).write_text(rewritten)
                        changed.append(f"{entry.name}/configs/{cfg.name}")
                    else:
                        (target / "configs" / cfg.name).symlink_to(cfg.resolve())
            else:
                (target / child.name).symlink_to(child.resolve(), target_is_directory=child.is_dir())
        if not (entry / "config.pbtxt").exists():
            raise ValueError(f"model {entry.name} has no config.pbtxt")
    return changed


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        params = json.loads(argv[2])
        if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
            raise ValueError("PARAMETERS_JSON must be {model: {parameter: value}}")
        changed = prepare(Path(argv[0]), Path(argv[1]), params)
    except (ValueError, OSError) as exc:
        print(f"prepare_repository: {exc}", file=sys.stderr)
        return 1
    names = ", ".join(f"{m}.{k}" for m, kv in sorted(params.items()) for k in sorted(kv))
    print(f"prepare_repository: {argv[1]} from {argv[0]}; parameters set: {names or 'none'}; "
          f"configs rewritten: {', '.join(changed) or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
