import pytest

from msl_rec.data.errors import DataError
from msl_rec.data.io import Sample, read_samples

HEADER = "user_id,item_ids,timestamp\n"
KNOWN = {1, 2, 3}


def write(tmp_path, text, name="rows.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_rows_in_order(tmp_path):
    path = write(tmp_path, HEADER + '7,"[1, 2, 3]",100\n8,"[3, 1]",50\n')
    assert read_samples(path, KNOWN) == [Sample(7, (1, 2), 3, 100), Sample(8, (3,), 1, 50)]


def test_books_files_read():
    samples = read_samples("data/books/valid.csv")
    assert len(samples) == 3472 and all(len(s.history) >= 4 for s in samples)


@pytest.mark.parametrize("body, match", [
    ('1,"[1, 2]",5\n2,"[1, x]",6\n', r"row 2 \(line 3\): field 'item_ids' is not a list of integers"),
    ('1,"[1, 2.5]",5\n', r"row 1 \(line 2\): field 'item_ids' is not a list of integers"),
    ('1,"5",5\n', r"row 1 \(line 2\): field 'item_ids' is not a list of integers"),
    ('1,"[1]",5\n', r"row 1 \(line 2\): field 'item_ids' has 1 id"),
    ('1,"[1, 2]",5\n1,"[1, 9]",5\n', r"row 2 \(line 3\): field 'item_ids': unknown item id\(s\) \[9\]"),
    ('u1,"[1, 2]",5\n', r"row 1 \(line 2\): field 'user_id' is not an integer"),
    ('1,"[1, 2]",\n', r"row 1 \(line 2\): field 'timestamp' is not an integer"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, body, match):
    path = write(tmp_path, HEADER + body)
    with pytest.raises(DataError, match=match) as err:
        read_samples(path, KNOWN)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv: data file not found"):
        read_samples(tmp_path / "nope.csv")


def test_missing_column(tmp_path):
    path = write(tmp_path, 'user_id,items,timestamp\n1,"[1, 2]",5\n')
    with pytest.raises(DataError, match=r"rows.csv: header: missing column\(s\) \['item_ids'\]"):
        read_samples(path)
