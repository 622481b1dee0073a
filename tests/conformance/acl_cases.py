#!/usr/bin/env python3
"""Per-topic ACL cases for a broker running with `tests/conformance/acl_file`.

The same cases run against Debian's Mosquitto and against mqtt-notary (the
e2e test `acl`), which must give the same answers, and the answers the
table expects. Each case: a subscriber on `#` (or a filter), a publisher,
one QoS 1 publish; then a marker from `admin` that every client may read.
Delivered means the message came before the marker (no sleeps).

    acl_cases.py --port 1883     one JSON line per case: {"case", "delivered", "expected"}
"""

import argparse
import json
import sys

import mqtt_conformance as mc

ANON = None

# (name, publisher (username, client id), subscriber username, topic, expected)
CASES = [
    # Mosquitto's own test: one client publishes and reads its own topic.
    ("anonymous-global", (ANON, "acl-check"), ANON, "topic/global", True),
    ("user-on-anonymous-global", ("username", "acl-check"), "username", "topic/global", False),
    ("anonymous-global-deny", (ANON, "acl-check"), ANON, "topic/global/except", False),
    ("anonymous-on-user-tree", (ANON, "acl-check"), ANON, "topic/username", False),
    ("user-tree", ("username", "acl-check"), "username", "topic/username", True),
    ("user-tree-deny", ("username", "acl-check"), "username", "topic/username/except", False),
    ("anonymous-on-user-pattern", (ANON, "acl-check"), ANON, "pattern/username", False),
    ("user-pattern", ("username", "acl-check"), "username", "pattern/username", True),
    ("user-pattern-deny", ("username", "acl-check"), "username", "pattern/username/except", False),
    # Read-only and write-only users, each way.
    ("reader-reads", ("admin", "acl-admin"), "reader", "sensors/a", True),
    ("reader-cannot-write", ("reader", "acl-reader"), "admin", "sensors/b", False),
    ("writer-writes", ("writer", "acl-writer"), "admin", "sensors/c", True),
    ("writer-cannot-read", ("admin", "acl-admin"), "writer", "sensors/d", False),
    # %c: a client's own tree, not another's.
    ("client-id-pattern", (ANON, "c1"), "admin", "clients/c1/x", True),
    ("client-id-pattern-other", (ANON, "c1"), "admin", "clients/c2/x", False),
    # A client id with a wildcard would match others' trees: no pattern applies.
    ("wildcard-client-id-gets-no-pattern", (ANON, "c+"), "admin", "clients/c1/x", False),
]


def delivered(sub, marker_topic, topic):
    seen = sub.until(marker_topic)
    return any(m.topic == topic for m in seen)


def run_case(name, publisher, sub_user, topic):
    sub = mc.Client(client_id=mc.uid("sub"), username=sub_user)
    pub = None
    admin = None
    try:
        sub.sub("#", 1)
        pub_user, pub_id = publisher
        pub = mc.Client(client_id=pub_id, username=pub_user)
        pub.pub(topic, b"case " + name.encode(), qos=1)
        admin = mc.Client(client_id=mc.uid("admin"), username="admin")
        marker = "marker/" + mc.uid("m")
        admin.pub(marker, b"marker", qos=1)
        return delivered(sub, marker, topic)
    finally:
        for c in (sub, pub, admin):
            if c:
                c.close()


def retained_cases():
    """A retained message reaches a new subscriber only if it may read it."""
    admin = mc.Client(client_id=mc.uid("admin"), username="admin")
    admin.pub("sensors/retained", b"kept", qos=1, retain=True)
    out = []
    try:
        for name, user in (("retained-to-reader", "reader"), ("retained-not-to-writer", "writer")):
            sub = mc.Client(client_id=mc.uid("sub"), username=user)
            try:
                sub.sub("sensors/#", 1)
                sub.sub("marker/#", 1)
                marker = "marker/" + mc.uid("m")
                admin.pub(marker, b"marker", qos=1)
                out.append((name, delivered(sub, marker, "sensors/retained")))
            finally:
                sub.close()
    finally:
        admin.pub("sensors/retained", b"", qos=1, retain=True)
        admin.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    mc.PORT = args.port
    results = [(name, run_case(name, p, s, t), want) for name, p, s, t, want in CASES]
    results += [(name, got, name == "retained-to-reader") for name, got in retained_cases()]
    for name, got, want in results:
        print(json.dumps({"case": name, "delivered": got, "expected": want}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
