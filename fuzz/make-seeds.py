#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target (fuzz/seeds/<target>/) from
the test vectors, so fuzzing starts from inputs that reach every step.
Run from the repository root after the vectors change; the output is
committed. File names are the SHA-1 of the content, as libFuzzer names them."""

import base64
import hashlib
import json
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "seeds"
bundles = json.loads((ROOT / "tests/vectors/bundles.json").read_text())["cases"]
envelopes = json.loads((ROOT / "tests/vectors/envelopes.json").read_text())
seeds = {t: set() for t in ["envelope", "differential", "bundle", "note", "records", "request"]}

for c in envelopes:
    raw = bytes.fromhex(c["envelope_hex"])
    seeds["envelope"].add(b"\x00" + raw)
    seeds["differential"].add(raw)

for c in bundles:
    text = c["bundle_json"].encode()
    seeds["bundle"].add(text + b"\x00" + bytes.fromhex(c["payload_hex"]))
    try:
        b = json.loads(c["bundle_json"])
    except ValueError:
        continue
    if not isinstance(b, dict):
        continue
    notes = [b.get("checkpoint")] + [a.get("checkpoint") for a in b.get("later_anchors", [])]
    notes += [r.get("head") for r in b.get("receipts", []) if isinstance(r, dict)]
    seeds["note"].update(n.encode() for n in notes if isinstance(n, str))
    for prefix, field in [(b"\x00", "leaf"), (b"\x01", "batch")]:
        try:
            seeds["records"].add(prefix + base64.b64decode(b[field], validate=True))
        except (KeyError, ValueError, TypeError):
            pass

digest = "ab" * 32
for req in [
    {"id": 1, "digest": digest},
    {"id": "x", "digest": digest.upper(), "reply_to": "$notary/inbox/c/proof"},
    {"digest": "zz"},
    {"id": [1, {"a": None}], "digest": digest, "reply_to": 7},
]:
    seeds["request"].add(json.dumps(req).encode())

shutil.rmtree(SEEDS, ignore_errors=True)
for target, items in seeds.items():
    d = SEEDS / target
    d.mkdir(parents=True)
    for item in items:
        (d / hashlib.sha1(item).hexdigest()).write_bytes(item)
    print(f"{target}: {len(items)} seeds")
