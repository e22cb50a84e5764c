//! Every column type, exactly: PostgreSQL's built-in types, with their modifiers and awkward values,
//! arrays, enums, domains, composites and ranges, through the initial copy, the stream and sweeps;
//! type pairs that convert; target identity columns; keys of other types and collations.

use std::time::Duration;

use crate::harness::{Pair, count};

/// The same on both sides. Every column but the key is nullable, so that NULLs travel too.
const EVERY_TYPE: &str = r#"
    CREATE TYPE mood AS ENUM ('happy', 'sad', 'it''s complicated');
    CREATE DOMAIN positive AS integer CHECK (VALUE > 0);
    CREATE TYPE pair AS (label text, amount numeric(8,2));
    CREATE TABLE every_type (
        id          integer PRIMARY KEY,
        i2 smallint, i8 bigint, num numeric(12,3), num_free numeric, r4 real, r8 double precision,
        money_ money, ch char(3), vc varchar(5), txt text, bin bytea,
        ts timestamp(3), tstz timestamptz(0), d date, tm time(2), ttz timetz, iv interval,
        iv_hm interval hour to minute, b boolean,
        pt point, ln line, ls lseg, bx box, pth path, pg polygon, ci circle,
        cidr_ cidr, inet_ inet, mac macaddr, mac8 macaddr8,
        bits bit(8), vbits varbit(10), tsv tsvector, tsq tsquery, u uuid, x xml, j json, jb jsonb,
        r_int int4range, r_num numrange, r_ts tstzrange, r_d daterange, mr int4multirange,
        lsn pg_lsn, snap pg_snapshot,
        a_int integer[], a_2d integer[][], a_ch char(3)[], a_txt text[], a_bits bit(8)[],
        a_num numeric(6,2)[], a_r8 double precision[],
        feeling mood, feelings mood[], pos positive, composite pair, composites pair[],
        updated_at timestamptz NOT NULL DEFAULT now()
    );"#;

/// Rows with the values that break naive sync tools: NaN, ±Infinity, -0, trailing spaces, quotes,
/// multi-dimensional arrays with NULLs and lower bounds other than 1, empty values.
const ROWS: &str = r#"
    INSERT INTO every_type VALUES
    (1, -32768, 9223372036854775807, 123456789.125, 'NaN', 'NaN', '-0',
     '$1,234.56', 'ab', 'abcde', 'it''s "quoted"\ttab', '\x00ff10',
     '2024-02-29 23:59:59.999', '2024-03-31 01:30:00+02', '4713-01-01 BC', '23:59:59.99', '12:00:00-05:30',
     '1 year 2 mons 3 days 04:05:06.789', '30 hours 15 minutes', true,
     '(1.5,-2)', '{1,-1,0}', '[(0,0),(1,1)]', '(2,2),(0,0)', '[(0,0),(1,1),(2,0)]', '((0,0),(1,1),(1,0))', '<(0,0),2>',
     '10.0.0.0/8', '192.168.1.5/24', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',
     B'10101010', B'101', 'a fat cat', 'fat & (rat | cat)', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
     '<a b="c">text</a><!-- a fragment -->', '{"b": 1, "a": [1.50, 2]}', '{"b": 1, "a": [1.50, 2]}',
     '[1,10)', '(0.5,]', '["2024-01-01 00:00+00","2024-01-02 00:00+00")', 'empty', '{[1,3), [5,7)}',
     '16/B374D848', '10:20:10,14,15',
     '{1,NULL,3}', '[0:1][1:2]={{1,2},{NULL,4}}', '{ab,"c  ",NULL}', '[0:1]={"a,b","c\"d"}', '{10101010,NULL}',
     '{1.50,-0.00,NaN}', '{Infinity,-Infinity,-0,1e-308}',
     'it''s complicated', '{happy,NULL,sad}', 7, '("a ""b"", c",12.50)', '{"(x,1.00)",NULL}', now()),
    (2, 0, 0, 0, 'Infinity', 'Infinity', '-Infinity', '-$0.01', '', '', '', '',
     'infinity', '-infinity', 'infinity', '00:00', '24:00:00+00', '-178956970 years -8 mons', '0', false,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     B'00000000', B'', '', NULL, NULL, '<x/>', 'null', '[]',
     'empty', NULL, NULL, NULL, '{}', '0/0', NULL,
     '{}', '{}', '{}', '{}', '{}', '{}', '{}', 'happy', '{}', NULL, '(,)', '{}', now()),
    (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, now());"#;

/// Changes that only the stream (and, for `bits`, a later sweep) carries.
const CHANGES: &str = r#"
    UPDATE every_type SET ch = 'xyz', a_ch = '{ABC,DE}', bits = B'11110000', vbits = B'1111111111',
           num = -0.001, r8 = 'Infinity', a_2d = '{{NULL,NULL},{5,6}}', updated_at = now() WHERE id = 1;
    INSERT INTO every_type (id, ch, a_ch, bits, a_bits, iv_hm, ts, num, x)
    VALUES (4, 'a', '{"b  ",c}', B'00000001', '{11111111}', '1 hour', '2000-01-01 00:00:00.123', 1.5,
            'plain text, no element');
    DELETE FROM every_type WHERE id = 3;"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_builtin_type_round_trips_exactly_in_the_copy_the_stream_and_sweeps() {
    let pair = Pair::new(EVERY_TYPE).await;
    let source = pair.source().await;
    source.batch_execute(ROWS).await.unwrap();
    let env = [
        ("SYNC_TABLES", "every_type"),
        ("SYNC_INTERVAL_MINUTES", "0.02"),
    ];
    let output = pair.rowsync(&["setup"], &env);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    pair.assert_synced("every_type").await;

    let _daemon = pair.spawn(&env);
    source.batch_execute(CHANGES).await.unwrap();
    pair.wait_synced("every_type", Duration::from_secs(20))
        .await;

    // The sweeps' path: a change made with the triggers off reaches the target by the look-back.
    source
        .batch_execute(
            "ALTER TABLE every_type DISABLE TRIGGER ALL;
             UPDATE every_type SET bits = B'00001111', a_ch = '{QQQ}', updated_at = now() WHERE id = 2;
             ALTER TABLE every_type ENABLE ALWAYS TRIGGER rowsync_capture_insert,
                 ENABLE ALWAYS TRIGGER rowsync_capture_update, ENABLE ALWAYS TRIGGER rowsync_capture_delete,
                 ENABLE ALWAYS TRIGGER rowsync_capture_truncate;",
        )
        .await
        .unwrap();
    pair.wait_synced("every_type", Duration::from_secs(30))
        .await;
    let target = pair.target().await;
    assert_eq!(
        count(&target, "SELECT count(*) FROM sync_errors").await,
        0,
        "nothing may be rejected"
    );
    // char(3)[] keeps its three characters (a cast to bare `character` would leave one).
    let a_ch: String = target
        .query_one("SELECT a_ch::text FROM every_type WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(a_ch, "{ABC,\"DE \"}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_pairs_convert_identity_columns_are_written_and_keys_of_any_collation_work() {
    let source_ddl = r#"
        CREATE TABLE items (
            code   text COLLATE "C" PRIMARY KEY,
            qty    integer,
            label  varchar(20),
            tag    text,
            serial integer NOT NULL
        );
        CREATE TABLE codes (code varchar(10) PRIMARY KEY, note text);"#;
    let target_ddl = r#"
        CREATE TABLE items (
            code   text COLLATE "C" PRIMARY KEY,
            qty    bigint,
            label  text,
            tag    char(4),
            serial integer GENERATED ALWAYS AS IDENTITY UNIQUE,
            extra  text DEFAULT 'target only'
        );
        CREATE TABLE codes (code char(4) PRIMARY KEY, note text);"#;
    let pair = Pair::with_ddl(source_ddl, target_ddl).await;
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO items VALUES ('a', 1, 'short', 'ab', 10), ('B', 2, 'x', NULL, 20);
             INSERT INTO codes VALUES ('ab', 'one'), ('abcd', 'two');",
        )
        .await
        .unwrap();
    let env = [("SYNC_TABLES", "items,codes")];
    let output = pair.rowsync(&["setup"], &env);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _daemon = pair.spawn(&env);
    source
        .batch_execute(
            "UPDATE items SET qty = 2147483647, label = 'a longer label', tag = 'xy' WHERE code = 'a';
             INSERT INTO items VALUES ('c', 3, 'new', 'abcd', 30);
             UPDATE codes SET note = 'changed' WHERE code = 'ab';
             INSERT INTO codes VALUES ('xyz', 'three');
             -- Too long for the target's char(4): rejected, recorded, never cut to 'abcd'.
             INSERT INTO items VALUES ('d', 4, 'long tag', 'abcdef', 40);",
        )
        .await
        .unwrap();
    let target = pair.target().await;
    pair.wait(
        "the long tag to be rejected",
        Duration::from_secs(20),
        || async {
            count(
                &target,
                "SELECT count(*) FROM sync_errors WHERE record_id = 'd'",
            )
            .await
                == 1
        },
    )
    .await;
    let projection = "SELECT code, qty::text, label, rtrim(tag), serial FROM items WHERE code <> 'd' ORDER BY code";
    pair.wait("items to converge", Duration::from_secs(20), || async {
        rows(&source, projection).await == rows(&target, projection).await
    })
    .await;
    assert_eq!(
        count(&target, "SELECT count(*) FROM items WHERE code = 'd'").await,
        0
    );
    let error_type: String = target
        .query_one(
            "SELECT error_type FROM sync_errors WHERE record_id = 'd'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(error_type, "SCHEMA_MISMATCH");
    // varchar keys into char(4) keys: padded, matched and deleted as char.
    pair.wait("codes to converge", Duration::from_secs(20), || async {
        count(&target, "SELECT count(*) FROM codes").await == 3
            && count(
                &target,
                "SELECT count(*) FROM codes WHERE code = 'ab' AND note = 'changed'",
            )
            .await
                == 1
    })
    .await;
    source
        .execute("DELETE FROM codes WHERE code = 'ab'", &[])
        .await
        .unwrap();
    pair.wait("the char key's delete", Duration::from_secs(20), || async {
        count(&target, "SELECT count(*) FROM codes WHERE code = 'ab'").await == 0
    })
    .await;
}

/// A key changed to a value its type calls equal to the old one (an email's case under
/// `citext`, numeric `1.0` to `1.00`, float `-0` to `0`, a jsonb number's scale) reaches the
/// target as the source writes it: before, the upsert matched the target row by the old key and
/// wrote only the other columns, so the target kept the old key for good, `verify` reported the
/// row twice and `repair` could not fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_changed_to_an_equal_value_written_differently_reaches_the_target() {
    let ddl = "CREATE EXTENSION citext;
        CREATE TABLE accounts (email citext PRIMARY KEY, name text);
        CREATE TABLE prices (amount numeric PRIMARY KEY, note text);
        CREATE TABLE points (x float8 PRIMARY KEY);
        CREATE TABLE docs (doc jsonb PRIMARY KEY, v int);";
    let pair = Pair::new(ddl).await;
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO accounts VALUES ('ann@example.com', 'Ann'), ('bob@example.com', 'Bob');
             INSERT INTO prices VALUES (1.0, 'one'), (2.5, 'two and a half');
             INSERT INTO points VALUES ('-0'), (1);
             INSERT INTO docs VALUES ('{\"n\": 1.0}', 1);",
        )
        .await
        .unwrap();
    let tables = "accounts,prices,points,docs";
    let env = [("SYNC_TABLES", tables)];
    let _daemon = set_up_and_run(&pair, &env).await;
    source
        .batch_execute(
            "UPDATE accounts SET email = 'Ann@Example.com' WHERE email = 'ann@example.com';
             UPDATE prices SET amount = 1.00 WHERE amount = 1;
             UPDATE points SET x = 0 WHERE x = 0;
             UPDATE docs SET doc = '{\"n\": 1.00}' WHERE v = 1;",
        )
        .await
        .unwrap();
    for table in tables.split(',') {
        pair.wait_synced(table, Duration::from_secs(20)).await;
    }
    let verify = pair.rowsync(&["verify"], &env);
    assert!(verify.status.success(), "{verify:?}");
}

/// A column whose target type is another (here `text`) gets the same value whether its row was
/// copied or streamed: the value's text by SQL's cast, as an assignment would store it. Before,
/// the copy wrote the type's output (`t`, `10.0.0.1`, a padded `char(5)`, an `xml` without its
/// declaration) and the stream the cast (`true`, `10.0.0.1/32`, ...), so the target depended on
/// which path last wrote a row, `verify` flagged the copied rows and `resync` undid `repair`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_converted_to_another_type_is_the_same_whether_copied_or_streamed() {
    let pair = Pair::with_ddl(
        "CREATE TABLE conv (id int PRIMARY KEY, b boolean, i inet, c char(5), x xml, m macaddr);",
        "CREATE TABLE conv (id int PRIMARY KEY, b text, i text, c varchar(10), x text, m text);",
    )
    .await;
    let source = pair.source().await;
    let values = "true, '10.0.0.1', 'ab', '<?xml version=\"1.0\"?><a/>', '08:00:2b:01:02:03'";
    source
        .batch_execute(&format!("INSERT INTO conv VALUES (1, {values})"))
        .await
        .unwrap();
    let env = [("SYNC_TABLES", "conv")];
    let _daemon = set_up_and_run(&pair, &env).await;
    source
        .batch_execute(&format!("INSERT INTO conv VALUES (2, {values})"))
        .await
        .unwrap();
    let target = pair.target().await;
    let cast = "SELECT id, concat_ws('|', b::text, i::text, c::text, x::text, m::text) FROM conv ORDER BY id";
    let expected: Vec<(i32, String)> = [1, 2]
        .into_iter()
        .map(|id| {
            (
                id,
                "true|10.0.0.1/32|ab|<?xml version=\"1.0\"?><a/>|08:00:2b:01:02:03".to_string(),
            )
        })
        .collect();
    assert_eq!(id_and_text(&source, cast).await, expected);
    pair.wait(
        "both rows in the target",
        Duration::from_secs(20),
        || async { count(&target, "SELECT count(*) FROM conv").await == 2 },
    )
    .await;
    assert_eq!(id_and_text(&target, cast).await, expected);
    let verify = pair.rowsync(&["verify"], &env);
    assert!(verify.status.success(), "{verify:?}");
}

/// A source `timestamp` or `date` into a target `timestamptz` is taken as UTC, in every path and
/// in `verify`, whatever the target server's time zone: before, the writes cast it in the target
/// session's zone and verify in UTC, so such a table never verified and repair could not fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_into_a_timestamptz_is_taken_as_utc_whatever_the_target_zone() {
    let pair = Pair::with_ddl(
        "CREATE TABLE stamps (id int PRIMARY KEY, at timestamp, day date);",
        "CREATE TABLE stamps (id int PRIMARY KEY, at timestamptz, day timestamptz);",
    )
    .await;
    let target = pair.target().await;
    target
        .batch_execute("ALTER DATABASE app SET timezone = 'America/New_York'")
        .await
        .unwrap();
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO stamps VALUES (1, '2020-01-01 00:00:00', '2020-06-01'), (2, 'infinity', NULL)",
        )
        .await
        .unwrap();
    let env = [("SYNC_TABLES", "stamps")];
    let _daemon = set_up_and_run(&pair, &env).await;
    source
        .batch_execute("INSERT INTO stamps VALUES (3, '2021-07-04 12:30:00.5', '2021-07-04')")
        .await
        .unwrap();
    let as_source = "SELECT id, concat_ws('|', at::text, day::text) FROM stamps ORDER BY id";
    let as_target = "SELECT id, concat_ws('|', (at AT TIME ZONE 'UTC')::text, (day AT TIME ZONE 'UTC')::date::text) FROM stamps ORDER BY id";
    let expected = id_and_text(&source, as_source).await;
    pair.wait("the streamed row", Duration::from_secs(20), || async {
        count(&target, "SELECT count(*) FROM stamps").await == 3
    })
    .await;
    let fresh = crate::harness::connect(&pair.target_url()).await;
    assert_eq!(id_and_text(&fresh, as_target).await, expected);
    let verify = pair.rowsync(&["verify"], &env);
    assert!(verify.status.success(), "{verify:?}");
}

/// `xml` values with an XML declaration verify: the target receives them as PostgreSQL outputs
/// them (without the declaration), and verify compares that output on both sides. Before, it
/// compared the source's cast to text, which keeps the declaration: such a table never verified,
/// and repair reported rows it could not fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xml_documents_with_a_declaration_verify() {
    let pair = Pair::new("CREATE TABLE docs (id int PRIMARY KEY, body xml);").await;
    let source = pair.source().await;
    let row = |id: i32| {
        format!(
            "INSERT INTO docs VALUES ({id}, '<?xml version=\"1.0\" encoding=\"UTF-8\"?><r a=\"1\"><b>&amp;</b></r>')"
        )
    };
    source.batch_execute(&row(1)).await.unwrap();
    let env = [("SYNC_TABLES", "docs")];
    let _daemon = set_up_and_run(&pair, &env).await;
    source.batch_execute(&row(2)).await.unwrap();
    pair.wait_synced("docs", Duration::from_secs(20)).await;
    let verify = pair.rowsync(&["verify"], &env);
    assert!(verify.status.success(), "{verify:?}");
}

/// A row the target rejects during the initial copy is isolated and recorded, and the log names
/// no value of it: PostgreSQL's message quotes the value (`invalid input value for enum mood:
/// "..."`), so the log line has the SQLSTATE only and sync_errors the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_the_target_rejects_in_the_copy_is_recorded_and_not_logged() {
    let pair = Pair::with_ddl(
        "CREATE TABLE moods (id int PRIMARY KEY, mood text);",
        "CREATE TYPE mood AS ENUM ('ok'); CREATE TABLE moods (id int PRIMARY KEY, mood mood);",
    )
    .await;
    let source = pair.source().await;
    source
        .batch_execute("INSERT INTO moods VALUES (1, 'ok'), (2, 'private-label')")
        .await
        .unwrap();
    let output = pair.rowsync(&["setup"], &[("SYNC_TABLES", "moods")]);
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{printed}");
    assert!(printed.contains("copying row by row"), "{printed}");
    assert!(!printed.contains("private-label"), "{printed}");
    let target = pair.target().await;
    let message: String = target
        .query_one(
            "SELECT error_message FROM sync_errors WHERE record_id = '2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(message.contains("private-label"), "{message}");
}

/// A table of built-in types only, arrays and ranges among them, is copied in binary, each value
/// as it is (the same types on both sides): sending them as text, as a copy in text does, broke
/// the binary copy (an empty array or any range failed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrays_and_ranges_are_copied_in_binary() {
    let pair = Pair::new(
        "CREATE TABLE tagged (id int PRIMARY KEY, tags text[], during int4range, spans int4multirange);",
    )
    .await;
    let source = pair.source().await;
    source
        .batch_execute(
            "INSERT INTO tagged VALUES (1, '{a,b}', '[1,5)', '{[1,2),[4,6)}'), (2, '{}', 'empty', '{}'),
                                       (3, NULL, '(,)', NULL), (4, '{{x,NULL},{\"q,\",z}}', '[0,1]', '{}')",
        )
        .await
        .unwrap();
    let output = pair.rowsync(&["setup"], &[("SYNC_TABLES", "tagged")]);
    assert!(output.status.success(), "{output:?}");
    // In one go: the target took every value as sent.
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!log.contains("copying row by row"), "{log}");
    pair.wait_synced("tagged", Duration::from_secs(10)).await;
}

/// `rowsync setup`, which must succeed, then the daemon, listening.
async fn set_up_and_run(pair: &Pair, env: &[(&str, &str)]) -> crate::harness::Daemon {
    let output = pair.rowsync(&["setup"], env);
    assert!(output.status.success(), "{output:?}");
    let daemon = pair.spawn(env);
    daemon.wait_listening(pair).await;
    daemon
}

/// `(id, text)` rows of `sql`.
async fn id_and_text(client: &tokio_postgres::Client, sql: &str) -> Vec<(i32, String)> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The rows of `sql` as text, for comparing a projection of two tables.
async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}|{:?}|{:?}|{:?}|{}",
                r.get::<_, String>(0),
                r.get::<_, Option<String>>(1),
                r.get::<_, Option<String>>(2),
                r.get::<_, Option<String>>(3),
                r.get::<_, i32>(4)
            )
        })
        .collect()
}
