# test_quickstart_unit.py: unit tests of quickstart.py's handlers, no Kafka needed.
from oncely.testing import TestDriver
from quickstart import add, app, charge


def test_add_counts_per_key():
    with TestDriver(app) as driver:                  # real RocksDB in a temp dir, in-memory log
        first = driver.send(add, "alice", 5)
        driver.send(add, "alice", 2)
        driver.send(add, "bob", 1)
        driver.run()                                 # until nothing is left to do
        assert driver.result(first) == 5
        assert driver.state("counter", "alice") == {"n": 7}


def test_charge_runs_its_side_effect_once_across_a_crash():
    with TestDriver(app, always_replay=True) as driver:  # every outcome re-checked by replay
        inv = driver.send(charge, "alice", {"card": "4242424242424242", "total": 30})
        driver.run()
        driver.crash()                               # lose what was not committed, recover
        driver.run()
        assert driver.result(inv) == "receipt-4242-30"
        assert driver.state("counter", "alice") == {"last_receipt": "receipt-4242-30"}
