"""vmsup trace files: a header, self-sized blocks, and (on a clean close) an index footer.

Learned from pcapng (self-sized blocks, readable after a crash), CTF (per-stream packets whose
context names the stream and its time range, so a reader can index a file without decoding it)
and perf.data (explicit LOST records). The file describes itself: the header holds the schema.

Modules, one concept each:
  format       framing: magic numbers, file header, blocks and their crc, block types, bounds, errors
  codec        the exact column encodings (delta, frame of reference, byte shuffle)
  exits_block  the EXITS block: its head (stream, sequence and time range) and its body
  writer       TraceWriter: a new file, or one continued after a crash
  block_index  the writer's list of every block for the footer, spilled to disk so memory stays flat
  scan         TraceScan: the one scan of a file on opening (header, blocks, crc, torn tail, footer)
  reader       TraceReader: the query API on what the scan found
  accounting   sequence continuity: holes no gap record explains, overlaps
"""

from .accounting import Discontinuity
from .exits_block import ExitBatch
from .format import (BLOCK_MAGIC, FORMAT_VERSION, MAGIC, RECORD_BLOCK_TYPES, TRAILER_MAGIC, BlockType, TraceError,
                     TraceFormatError, TraceWriteError)
from .reader import STREAM_DTYPES, Block, ExitBlockRef, StreamInfo, TraceReader
from .writer import TraceWriter

__all__ = ["BLOCK_MAGIC", "FORMAT_VERSION", "MAGIC", "RECORD_BLOCK_TYPES", "TRAILER_MAGIC", "STREAM_DTYPES", "Block",
           "BlockType", "Discontinuity", "ExitBatch", "ExitBlockRef", "StreamInfo", "TraceError", "TraceFormatError",
           "TraceReader", "TraceWriteError", "TraceWriter"]
