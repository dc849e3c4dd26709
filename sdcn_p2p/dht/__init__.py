"""Kademlia DHT over ``/sdcn/kad/2.0.0``: find peers, store and fetch signed records.

- `keys`: 256-bit keys, XOR distance, bucket indices.
- `routing`: the routing table of server peers (k-buckets), pure.
- `lookup`: the iterative lookup as a state machine, pure.
- `store`: the bounded record store and the validation of records, pure.
- `messages`: the wire format, pure.
- `service`: `Dht`, the only part that awaits: serves requests, runs lookups, puts and gets,
  joins through bootstrap peers and refreshes its buckets.
"""

from sdcn_p2p.dht.messages import KAD
from sdcn_p2p.dht.service import Dht, DhtConfig, LookupResult

__all__ = ["KAD", "Dht", "DhtConfig", "LookupResult"]
