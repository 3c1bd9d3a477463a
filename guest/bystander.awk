# The bystander's records: `<n> <payload> <checksum>`, n counting from 1, the
# checksum the two halves of an Adler-32 of "<n> <payload>". mode=write appends one record every
# 50 ms forever and reports progress on the console every 100 records;
# mode=verify checks a file and prints `ok|bad <records> <detail>`.
function adler(s,    i, a, b) {
    a = 1; b = 0
    for (i = 1; i <= length(s); i++) {
        a = (a + ord[substr(s, i, 1)]) % 65521
        b = (b + a) % 65521
    }
    return b "-" a
}
BEGIN {
    for (i = 32; i < 127; i++) ord[sprintf("%c", i)] = i
    if (mode == "write") {
        for (n = 1; ; n++) {
            body = n " bystander-record-" (n * 7919 % 10007)
            print body, adler(body) >> file
            fflush(file)
            if (n % 100 == 0) print "bystander: " n " records"
            system("usleep 50000")
        }
    }
}
mode == "verify" {
    body = $1 " " $2
    if ($1 != NR) { bad = "gap at line " NR " (record " $1 ")"; exit }
    if ($3 != adler(body)) { bad = "bad checksum at record " $1; exit }
    count = NR
}
END {
    if (mode != "verify") exit
    if (bad != "") print "bad", count + 0, bad
    else print "ok", count + 0, "records-1-to-" count + 0
}
