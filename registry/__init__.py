"""etcd: discovery, leases, locks, leader election and fenced transactions."""
