"""Seeing the swarm: a snapshot of the cluster (model), what fills it (collector), the
live `agentmesh status` view (live) and the read-only web dashboard (web).

Everything here reads the cluster through the public gRPC APIs and the etcd registry
(services/<kind>/, election/coordinator/), never through a service's internals, and
writes nothing to the cluster.
"""
