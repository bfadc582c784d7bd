"""``RowBook.append``: what each row keeps of a block of new tokens (cut at its budget and at EOS,
log Z summed over the kept tokens only), whatever block its caller hands it."""

import torch

from sss_ext.decoding.rows import RowBook
from sss_ext.decoding.stats import StatsRecorder


def make_book(rows: int, max_new_tokens: int, eos=(), spare: int = 4) -> RowBook:
    return RowBook(torch.arange(rows), max_new_tokens, spare, eos, "cpu", StatsRecorder(rows))


def test_a_block_is_cut_at_the_budget():
    book = make_book(2, max_new_tokens=5)
    kept, done = book.append(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([3, 2]))
    assert kept.tolist() == [3, 2] and done.tolist() == [False, False]
    kept, done = book.append(torch.tensor([[7, 8, 9], [1, 2, 3]]), torch.tensor([3, 3]))
    assert kept.tolist() == [2, 3] and done.tolist() == [True, True]
    assert [s.tolist() for s in book.sequences()] == [[1, 2, 3, 7, 8], [4, 5, 1, 2, 3]]
    assert book.remaining().tolist() == [0, 0]


def test_a_block_without_counts_is_cut_at_the_budget():
    book = make_book(1, max_new_tokens=2)
    kept, done = book.append(torch.tensor([[4, 5, 6]]))
    assert kept.tolist() == [2] and done.tolist() == [True]
    assert book.sequences()[0].tolist() == [4, 5]


def test_a_row_keeps_its_first_eos_and_nothing_after():
    book = make_book(3, max_new_tokens=10, eos=(0, 9))
    kept, done = book.append(torch.tensor([[3, 0, 4, 0], [9, 3, 3, 3], [3, 3, 0, 3]]), torch.tensor([4, 4, 2]))
    assert kept.tolist() == [2, 1, 2] and done.tolist() == [True, True, False]  # row 2's EOS lies past its count
    assert [s.tolist() for s in book.sequences()] == [[3, 0], [9], [3, 3]]


def test_log_z_sums_over_the_kept_tokens_only():
    book = make_book(3, max_new_tokens=10, eos=(0,))
    log_z = torch.tensor([[0.5, 0.25, 8.0, 16.0], [1.0, 2.0, 4.0, 32.0], [64.0, 128.0, 256.0, 512.0]], dtype=torch.float64)
    kept, done = book.append(torch.tensor([[3, 3, 3, 3], [3, 0, 3, 3], [3, 3, 3, 3]]), torch.tensor([2, 4, 4]), log_z)
    assert kept.tolist() == [2, 2, 4]  # row 0: its count, row 1: cut after its EOS, row 2: the whole block
    assert book.log_z.tolist() == [0.75, 3.0, 960.0]
    book.remove(done)  # row 1 finished: rows 0 and 2 are the batch
    book.append(torch.tensor([[3, 3], [3, 3]]), torch.tensor([1, 2]), torch.tensor([[1024.0, 2048.0], [4096.0, 8192.0]]))
    assert book.log_z.tolist() == [1024.75, 3.0, 960.0 + 4096.0 + 8192.0]
