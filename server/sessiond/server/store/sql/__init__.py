"""Every store transaction, written once for every SQL backend.

`tx.py` is the small interface a backend provides (a transaction that runs `?`
statements, and a `Dialect` for what differs); the other modules hold the
transactions, one module per aggregate. `store.py` (`SqlStore`) implements the
`Store` contract with them; a backend subclass only says how a transaction runs.
"""
