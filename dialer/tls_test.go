package dialer

import "github.com/pgstagger/pgstagger/internal/testdb"

func startTLSCluster() (*testdb.Cluster, error) { return testdb.Start(testdb.Options{TLS: true}) }
