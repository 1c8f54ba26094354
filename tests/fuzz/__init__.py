"""The fuzz suite (issue 8): hostile protobuf, field values, source URLs, WHIP requests and video files against one
real all-in-one server, with fixed seeds and bounded counts. Totals print at the end of the run."""
