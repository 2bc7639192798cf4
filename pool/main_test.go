package pool

import (
	"testing"

	"github.com/pgstagger/pgstagger/internal/testdb"
)

// shared is the package's throwaway cluster, started by the first test that
// needs it: the tests that need no server run without PostgreSQL installed.
var shared = testdb.NewShared(testdb.Options{Settings: map[string]string{"max_connections": "100"}})

// db returns the shared cluster, starting it if it is not running yet.
func db(tb testing.TB) *testdb.Cluster {
	tb.Helper()
	return shared.Get(tb)
}

func TestMain(m *testing.M) { shared.Main(m) }
