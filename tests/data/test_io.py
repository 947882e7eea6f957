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


def test_header_only_csv_is_a_data_error(tmp_path):
    path = write(tmp_path, HEADER)
    with pytest.raises(DataError, match=r"rows.csv: no data rows \(only a header\)"):
        read_samples(path)


def test_utf8_bom_csv_reads(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + '7,"[1, 2]",100\n').encode())
    assert read_samples(path, KNOWN) == [Sample(7, (1,), 2, 100)]


def test_non_utf8_byte_names_line_and_offset(tmp_path):
    path = tmp_path / "latin.csv"
    body = (HEADER + '7,"[1, 2]",100\n').encode() + b'8,"[1, 2]",10\xe9\n'
    path.write_bytes(body)
    offset = body.index(b"\xe9")
    with pytest.raises(DataError, match=rf"latin.csv: line 3 \(byte offset {offset}\): .* not UTF-8"):
        read_samples(path)


@pytest.mark.parametrize("body, field", [
    (f'{2**63},"[1, 2]",5\n', "user_id"),
    (f'1,"[1, {2**63}]",5\n', "item_ids"),
    (f'1,"[1, 2]",{-2**63 - 1}\n', "timestamp"),
])
def test_ids_beyond_int64_name_row_and_field(tmp_path, body, field):
    path = write(tmp_path, HEADER + '1,"[1, 2]",5\n' + body)
    with pytest.raises(DataError, match=rf"rows.csv: row 2 \(line 3\): field '{field}': -?\d+ does not fit in int64"):
        read_samples(path)
    assert read_samples(write(tmp_path, HEADER + f'{2**63 - 1},"[1, 2]",5\n'))[0].user_id == 2**63 - 1
