"""splitter: route or mirror Segment-style tracking events to Segment, RudderStack or both."""

__version__ = "0.1.0"
