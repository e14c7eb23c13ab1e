"""Many sites, one model: edgecl daemons federated with Flower (`pip install
'edgecl[federation]'`). The ClientApp is a client of its site's daemon; the ServerApp runs
FedAvg's rounds with a class-aware aggregation (docs/federation.md)."""
