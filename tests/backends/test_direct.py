import pytest

import updatebuffer
from updatebuffer.backends.direct import DirectBuffer
from updatebuffer.testing.contract import BufferContract, Recorder


class TestDirectContract(BufferContract):
    buffers = False
    dead_letters = False

    @pytest.fixture
    def make_buffer(self):
        made = []

        def make(flush, **options):
            # Options about buffering do not apply to a pass-through backend.
            buf = DirectBuffer(flush=flush)
            made.append(buf)
            return buf

        yield make
        for buf in made:
            buf.close()


def test_incr_calls_flush_with_one_row_batch():
    rec = Recorder()
    buf = updatebuffer.from_url("direct://", flush=rec)
    assert type(buf) is DirectBuffer
    buf.incr("g", {"n": 2}, {"id": 1}, {"m": "x"})
    [batch] = rec.calls
    assert len(batch) == 1 and batch.attempt == 1
    assert batch[0].columns == {"n": 2} and batch[0].extra == {"m": "x"}


def test_callback_error_propagates_unchanged():
    boom = ValueError("db down")

    def flush(batch):
        raise boom

    buf = DirectBuffer(flush=flush)
    with pytest.raises(ValueError) as info:
        buf.incr("g", {"n": 1}, {"id": 1})
    assert info.value is boom
    assert buf.stats().callback_failures == 1


def test_direct_rejects_options():
    with pytest.raises(updatebuffer.ConfigurationError, match="delay"):
        updatebuffer.from_url("direct://?delay=1", flush=Recorder())
