"""XLS-R batching: utterances bucketed by length within each part."""

from featcache.extract.xlsr import LengthBuckets


def test_length_buckets_sort_each_part_and_never_span_parts():
    lengths = [50, 10, 40, 30, 20, 60, 5, 70, 15, 25]
    buckets = LengthBuckets([0, 2], rows=10, part_rows=4, batch_size=3, length=lengths.__getitem__)
    assert list(buckets) == [[1, 3, 2], [0], [8, 9]]  # part 0 by length (10, 30, 40 | 50), then part 2
    assert len(buckets) == 3
