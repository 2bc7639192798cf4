package dialer

import (
	"context"
	"fmt"
	"testing"

	"github.com/pgstagger/pgstagger/internal/testdb"
)

// db is the package's shared throwaway cluster.
var db *testdb.Cluster

func TestMain(m *testing.M) {
	testdb.Main(m, &db, testdb.Options{Settings: map[string]string{"max_connections": "100"}})
}

// ensureRole creates a login role if it does not exist yet, so tests can run
// more than once against the shared cluster.
func ensureRole(t *testing.T, name, password, options string) {
	t.Helper()
	sql := fmt.Sprintf(`do $$ begin create role %s login password '%s' %s; exception when duplicate_object then null; end $$`,
		name, password, options)
	if err := db.Exec(context.Background(), sql); err != nil {
		t.Fatal(err)
	}
}
