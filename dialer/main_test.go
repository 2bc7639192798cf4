package dialer

import (
	"context"
	"fmt"
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

// ensureRole creates a login role if it does not exist yet, so tests can run
// more than once against the shared cluster.
func ensureRole(t *testing.T, name, password, options string) {
	t.Helper()
	sql := fmt.Sprintf(`do $$ begin create role %s login password '%s' %s; exception when duplicate_object then null; end $$`,
		name, password, options)
	if err := db(t).Exec(context.Background(), sql); err != nil {
		t.Fatal(err)
	}
}
