"""Export ``analysis=features``' saved records as Neuronpedia's bulk-import layout (the one SAEDashboard's
``neuronpedia_export`` writes), reading only the study's files, never its internals:

    python -m sae.features.neuronpedia <features out> <export dir> --model <model name or dir>

``<features out>`` is where ``evaluate.py analysis=features`` wrote ``features/<method>.json``; ``--model`` gives the
tokenizer that turns the records' token ids into strings and Neuronpedia's model id (its last path part). Per
method (a dictionary or a baseline at one hook), under ``<export dir>/<model id>/<layer>-<method>-<site>/``:
``release.jsonl``, ``model.jsonl``, ``sourceset.jsonl``, ``source.jsonl`` (one line each),
``features/batch-0.jsonl.gz`` (a line per feature: its density, max activation, the tokens its decoder direction
promotes and suppresses, its activation histogram) and ``activations/batch-0.jsonl.gz`` (a line per example
context: tokens, the feature's value on each, the example's quantile bin). Dead features (no activation) have a
feature line and no activation lines. The export appears whole or not at all.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from datetime import datetime, timezone
from pathlib import Path

from sae.errors import ConfigError, exit_on_config_error
from sae.io.atomic import staged_directory
from sae.io.saelens import SITE_HOOKS
from sae.lm.model import load_tokenizer

CREATOR = "sae"  # Neuronpedia's creatorId: the importer's own replaces it
HOOK_NAME = re.compile(r"layers\.(\d+)\.(\w+)")


def read_methods(features_out: Path) -> dict[str, dict]:
    """``features/<method>.json`` under ``features_out``: method -> {name, hook, features}."""
    files = sorted((features_out / "features").glob("*.json"))
    if not files:
        raise ConfigError(f"no features/<method>.json under '{features_out}': run evaluate.py ... analysis=features "
                          "first and give its out directory")
    methods = {}
    for path in files:
        try:
            saved = json.loads(path.read_text())
            methods[path.stem] = {"hook": saved["hook"], "features": list(saved["features"])}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: not a features record file ({type(err).__name__}: {err}); write it again "
                              "with analysis=features") from None
        if not HOOK_NAME.fullmatch(methods[path.stem]["hook"]):
            raise ConfigError(f"{path}: hook '{methods[path.stem]['hook']}' is not layers.<i>.<site>")
    return methods


def source_id(method: str, hook: str) -> tuple[int, str, str]:
    """``(layer, source set, source id)``: Neuronpedia's ``<layer>-<set>`` naming."""
    layer, site = HOOK_NAME.fullmatch(hook).groups()
    source_set = re.sub(r"[^a-z0-9]+", "-", f"{method.split('_layers')[0]}-{site}".lower()).strip("-")
    return int(layer), source_set, f"{layer}-{source_set}"


def feature_line(record: dict, model_id: str, source: str, hook_name: str, decode) -> dict:
    """One Neuronpedia feature row (the fields of SAEDashboard's ``Feature``) from one feature record."""
    direct = record.get("direct") or {"up": [], "down": []}
    histogram = record.get("histogram") or {"edges": [], "stacks": []}
    edges = histogram["edges"]  # the stacks (one per top token, then the rest) summed: the whole histogram
    heights = [sum(counts) for counts in zip(*(stack["counts"] for stack in histogram["stacks"]))]
    return {
        "modelId": model_id, "layer": source, "index": str(record["index"]), "creatorId": CREATOR,
        "createdAt": datetime.now(timezone.utc).isoformat(), "maxActApprox": float(record.get("max", 0.0)),
        "hasVector": False, "vector": [], "vectorLabel": None, "hookName": hook_name,
        "topkCosSimIndices": [], "topkCosSimValues": [],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        "pos_str": [decode(t) for t, _ in direct["up"]], "pos_values": [float(v) for _, v in direct["up"]],
        "neg_str": [decode(t) for t, _ in direct["down"]], "neg_values": [float(v) for _, v in direct["down"]],
        "frac_nonzero": float(record["density"]),
        "freq_hist_data_bar_heights": [float(h) for h in heights],
        "freq_hist_data_bar_values": [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
    }


def examples(record: dict) -> list[tuple[dict, list | None]]:
    """The record's example contexts: the top ones (no bin), then each quantile's with its range."""
    out = [(e, None) for e in record.get("top", [])]
    for quantile in record.get("quantiles", []):
        out += [(e, quantile["range"]) for e in quantile["examples"]]
    return out


def activation_line(example: dict, bin_range: list | None, record: dict, model_id: str, source: str, decode,
                    number: int) -> dict:
    """One Neuronpedia activation row (the fields of SAEDashboard's ``Activation``)."""
    values = [float(v) for v in example["acts"]]
    top = max(range(len(values)), key=values.__getitem__)
    return {
        "id": f"{source}-{record['index']}-{number}", "tokens": [decode(t) for t in example["tokens"]],
        "index": str(record["index"]), "layer": source, "modelId": model_id, "maxValue": values[top],
        "maxValueTokenIndex": top, "minValue": min(values), "values": values, "creatorId": CREATOR,
        "dataSource": None, "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,
        "createdAt": datetime.now(timezone.utc).isoformat(), "lossValues": [], "logitContributions": None,
        "binMin": None if bin_range is None else float(bin_range[0]),
        "binMax": None if bin_range is None else float(bin_range[1]),
        "binContains": None, "qualifyingTokenIndex": int(example["focus"]),
    }


def write_jsonl(path: Path, rows: list[dict], gzipped: bool = False) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=5) if gzipped else data)


def write_source(directory: Path, method: str, saved: dict, model_id: str, decode) -> int:
    """One method's source folder; returns the number of features written."""
    layer, source_set, source = source_id(method, saved["hook"])
    site = HOOK_NAME.fullmatch(saved["hook"]).group(2)
    hook_name = f"blocks.{layer}.{SITE_HOOKS.get(site, site)}"
    now = datetime.now(timezone.utc).isoformat()
    write_jsonl(directory / "release.jsonl", [{"name": model_id, "description": f"{model_id} dictionaries",
                                               "creatorName": CREATOR, "creatorId": CREATOR, "createdAt": now}])
    write_jsonl(directory / "model.jsonl", [{"id": model_id, "instruct": False, "creatorId": CREATOR,
                                             "displayName": model_id, "displayNameShort": model_id, "createdAt": now}])
    write_jsonl(directory / "sourceset.jsonl", [{"modelId": model_id, "name": source_set, "creatorId": CREATOR,
                                                 "description": method, "releaseName": model_id, "createdAt": now}])
    write_jsonl(directory / "source.jsonl", [{"id": source, "modelId": model_id, "setName": source_set,
                                              "creatorId": CREATOR, "hasDashboards": True, "createdAt": now}])
    records = saved["features"]
    features = [feature_line(r, model_id, source, hook_name, decode) for r in records]
    activations = [activation_line(e, bins, r, model_id, source, decode, n)
                   for r in records for n, (e, bins) in enumerate(examples(r))]
    write_jsonl(directory / "features" / "batch-0.jsonl.gz", features, gzipped=True)
    write_jsonl(directory / "activations" / "batch-0.jsonl.gz", activations, gzipped=True)
    return len(features)


def export(features_out: Path, export_dir: Path, model: str) -> Path:
    """Every method under ``features_out`` as a Neuronpedia source under ``export_dir/<model id>/``."""
    methods = read_methods(features_out)
    if export_dir.exists() and any(export_dir.iterdir()) and not list(export_dir.glob("*/*/source.jsonl")):
        raise ConfigError(f"'{export_dir}' exists and is not an earlier export; give a new or empty directory")
    tokenizer = load_tokenizer(model)
    model_id = Path(model).name.lower()
    decode = lambda token_id: tokenizer.decode([int(token_id)])  # noqa: E731
    with staged_directory(export_dir) as tmp:
        for method, saved in methods.items():
            n = write_source(tmp / model_id / source_id(method, saved["hook"])[2], method, saved, model_id, decode)
            print(f"{method}: {n} features")
    return export_dir / model_id


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export analysis=features' records in Neuronpedia's bulk layout.")
    parser.add_argument("features_out", type=Path, help="the out directory of evaluate.py ... analysis=features")
    parser.add_argument("export_dir", type=Path, help="a new directory for the export")
    parser.add_argument("--model", required=True, help="the LM's name or directory (its tokenizer; the model id)")
    args = parser.parse_args(argv)
    print(f"exported to {export(args.features_out, args.export_dir, args.model)}")


if __name__ == "__main__":
    main()
