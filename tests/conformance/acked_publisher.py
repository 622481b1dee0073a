#!/usr/bin/env python3
"""Publishes `PREFIX-0`, `PREFIX-1`, ... at one QoS as fast as the broker
acknowledges, and prints each payload on stdout (flushed) the moment its
acknowledgement arrives: PUBACK for QoS 1, PUBCOMP for QoS 2, refusals
(MQTT 5 reason codes >= 0x80) excluded. Stops at COUNT messages or when the
broker goes away. The durability tests read this list as "every message the
broker promised to keep"."""

import argparse
import sys
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--qos", type=int, choices=(1, 2), default=1)
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--pad", type=int, default=0, help="bytes of padding after each payload's number")
    ap.add_argument("--v5", action="store_true")
    args = ap.parse_args()

    # Never held across a paho call: paho runs callbacks under its own
    # locks, which `publish` takes too.
    lock = threading.Lock()
    sent = {}  # mid -> payload, once `publish` returned
    early = {}  # mid -> failed?, for acknowledgements that beat `publish`
    gone = threading.Event()
    room = threading.Semaphore(args.inflight)

    def emit(payload, failed):
        if not failed:
            sys.stdout.write(payload + "\n")
            sys.stdout.flush()

    def on_publish(client, userdata, mid, rc, props):
        failed = rc is not None and rc.is_failure
        with lock:
            payload = sent.pop(mid, None)
            if payload is None:
                early[mid] = failed
        room.release()
        if payload is not None:
            emit(payload, failed)

    def on_disconnect(client, userdata, flags, rc, props):
        gone.set()
        for _ in range(args.inflight):
            room.release()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{args.prefix}-pub",
                    protocol=mqtt.MQTTv5 if args.v5 else mqtt.MQTTv311)
    c.max_inflight_messages_set(args.inflight)
    c.on_publish = on_publish
    c.on_disconnect = on_disconnect
    c.connect("127.0.0.1", args.port, 60)
    c.loop_start()
    for i in range(args.count):
        room.acquire()
        if gone.is_set():
            break
        payload = f"{args.prefix}-{i}" + ":" * bool(args.pad) + "x" * args.pad
        info = c.publish(args.topic, payload, args.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            room.release()
            break
        with lock:
            failed = early.pop(info.mid, None)
            if failed is None:
                sent[info.mid] = payload
        if failed is not None:
            emit(payload, failed)
    # Wait for the last acknowledgements (or for the broker to go away).
    while not gone.is_set():
        with lock:
            if not sent:
                break
        gone.wait(0.05)
    c.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
