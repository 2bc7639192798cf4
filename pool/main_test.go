package pool

import (
	"testing"

	"github.com/pgstagger/pgstagger/internal/testdb"
)

// db is the package's shared throwaway cluster.
var db *testdb.Cluster

func TestMain(m *testing.M) {
	testdb.Main(m, &db, testdb.Options{Settings: map[string]string{"max_connections": "100"}})
}
