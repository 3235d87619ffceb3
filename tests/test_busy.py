"""rtinfer.busy: an instance that executes is seen as busy by the others of its server, and only then;
markers of another server are not seen; closing removes the files."""
from __future__ import annotations

import os

from rtinfer import busy


def test_a_marker_is_seen_busy_only_while_held():
    server = 10**9 + os.getpid()  # no real process has this id: a directory of our own
    pre, clf = busy.Marker("preprocess_0_0", server), busy.Marker("classifier_onnx_0_0", server)
    other_server = busy.Marker("preprocess_0_0", server + 1)
    try:
        assert not clf.others_busy()
        with pre:
            assert clf.others_busy()
            assert not pre.others_busy()  # its own marker does not count
        assert not clf.others_busy()
        with other_server:
            assert not clf.others_busy()
    finally:
        for m in (pre, clf, other_server):
            m.close()
    assert not os.path.exists(clf.dir) and not os.path.exists(other_server.dir)
