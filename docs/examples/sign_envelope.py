#!/usr/bin/env python3
"""Sign a message as an mqtt-notary device envelope (COSE_Sign1, EdDSA).

Needs cbor2 and pynacl (pip install cbor2 pynacl). Writes the envelope
bytes to --out; publish them as the MQTT payload on the same topic, e.g.

    python3 sign_envelope.py --id meter-17 --key meter-17.key \\
        --topic meters/17 --counter 1 --message '{"kwh": 1.5}' --out env.cbor
    mosquitto_pub -t meters/17 -q 1 -f env.cbor

--key is the file `mqtt-notary device keygen` writes: the ed25519 seed as
64 hex digits. The counter must be higher than any this device used
before; keep it in durable storage on the device.
"""

import argparse
import time

import cbor2
from nacl.signing import SigningKey

ALG_EDDSA = -8
LABEL_COUNTER = -65537
LABEL_DEVICE_TIME = -65538
LABEL_TOPIC = -65539


def sign_envelope(seed, device_id, topic, counter, payload, content_type, time_ms=None):
    """Returns the bytes of a tagged COSE_Sign1 envelope."""
    if time_ms is None:
        time_ms = int(time.time() * 1000)
    protected = cbor2.dumps({
        1: ALG_EDDSA,                   # alg
        3: content_type,                # content type
        4: device_id.encode("ascii"),   # kid: the device id
        LABEL_COUNTER: counter,
        LABEL_DEVICE_TIME: time_ms,
        LABEL_TOPIC: topic,
    })
    # RFC 9052 Sig_structure; the MQTT topic is the external AAD.
    to_sign = cbor2.dumps(["Signature1", protected, topic.encode("utf-8"), payload])
    signature = SigningKey(seed).sign(to_sign).signature
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, signature]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--id", required=True, help="device id (the enrolled id)")
    p.add_argument("--key", required=True, help="device key file: 64 hex digits")
    p.add_argument("--topic", required=True, help="the topic it will be published on")
    p.add_argument("--counter", required=True, type=int, help="strictly increasing per device")
    p.add_argument("--message", required=True, help="the payload (UTF-8 text)")
    p.add_argument("--content-type", default="text/plain")
    p.add_argument("--out", required=True, help="where to write the envelope bytes")
    a = p.parse_args()
    with open(a.key) as f:
        seed = bytes.fromhex(f.read().strip())
    envelope = sign_envelope(seed, a.id, a.topic, a.counter, a.message.encode("utf-8"), a.content_type)
    with open(a.out, "wb") as f:
        f.write(envelope)


if __name__ == "__main__":
    main()
