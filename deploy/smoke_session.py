"""deploy/smoke.sh, scale-out: after a restart of ``restarted``, the session ``session_id`` (fed
"the clouds are in the", then "sky" ``feeds - 1`` times) takes one more "sky" through nginx and
answers exactly as a fresh session fed the same text does. Retries while nginx and the replicas
reconnect."""

import sys
import time

from lstmd.client import Client, LstmdError

session_id, restarted, feeds = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Client("localhost:50051", wait_for_restart_s=30) as lstmd:
    for attempt in range(60):
        try:
            session = lstmd.get_session(session_id)
            break
        except LstmdError as error:
            if attempt == 59:
                raise
            print(f"waiting for the deployment after restarting {restarted}: {error.code}", flush=True)
            time.sleep(1)
    got = session.feed("sky")
    fresh = lstmd.create_session()
    for text in ["the clouds are in the", *["sky"] * feeds]:
        want = fresh.feed(text)
    fresh.delete()
assert got.position == want.position, (got.position, want.position)
assert [(c.word, c.probability) for c in got.candidates] == [(c.word, c.probability) for c in want.candidates]
print(
    f"after restarting {restarted}: session {session_id[:8]}... at position {got.position}, "
    "predictions identical to a fresh session's, bit for bit"
)
