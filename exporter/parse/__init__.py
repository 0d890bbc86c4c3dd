"""Bulk-status bodies (JSON or the keyless XML form) streamed into a ``ReportAggregator``.

Both formats are read incrementally and each recipient is handed to the aggregator as soon
as it is complete, so memory does not grow with the send:

- ``shape``: the names Mail Partner (``MAIL``) and SMS Partner (``SMS``) give the document;
- ``report``: what the parsers share: errors, the envelope check, one recipient's coercions;
- ``walk``: the exact JSON walker over yajl's events, the reference for every outcome;
- ``fast``: the JSON fast path for plain reports, which hands anything else to the walker;
- ``xml``: the keyless ``<result><entry>…`` form.
"""

from exporter.parse.fast import parse_json
from exporter.parse.report import (
    MAX_STATUS_LENGTH,
    Body,
    InvalidResponse,
    UpstreamError,
    error_code,
)
from exporter.parse.shape import MAIL, SMS, ReportShape
from exporter.parse.walk import parse_json_exact
from exporter.parse.xml import parse_xml

__all__ = [
    "MAIL",
    "MAX_STATUS_LENGTH",
    "SMS",
    "Body",
    "InvalidResponse",
    "ReportShape",
    "UpstreamError",
    "error_code",
    "parse_json",
    "parse_json_exact",
    "parse_xml",
]
