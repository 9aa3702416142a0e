r"""Two `ml-1m.seq.txt` files for the same users, differing only in tie order.

Issue 2 asks whether the order of items rated in the same second explains
part of the gap to generative-recommenders' SASRec row: it sorts
ratings.dat by timestamp, while `ml-1m-seq` (BERT4Rec's preprocessing)
orders same-second items otherwise. Only users 1..2,999 have timestamps
here (`ml-1m-ratings-partial`), so both files hold those users:

  <out>/seq_order/ml-1m-bert4rec-preprocessed/ml-1m.seq.txt
      their lines of the staged `ml-1m.seq.txt`, as they are;
  <out>/time_order/ml-1m-bert4rec-preprocessed/ml-1m.seq.txt
      the same items per user sorted by timestamp, stable: ties keep
      ratings.dat's line order;
  <out>/random_ties/ml-1m-bert4rec-preprocessed/ml-1m.seq.txt
      sorted by timestamp, ties in a seeded random order (what an unstable
      sort, e.g. pandas' default quicksort, gives).

78% of these users' interactions share their second with another one of
the same user, so the tie order decides most next-item targets.

Each is a manual directory for the `ml-1m-seq` builder
(`--config.data.manual_dir=<out>/<order>`, with a separate
`--config.data.data_dir`); derived from research-only data, so they are
written outside the repository.

  python experiments/001_sasrec_ml1m/ties/make_files.py \
      --shared=../shared/data --out=/tmp/ties
"""

import argparse
import collections
import gzip
import os
import random


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shared", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  rated = collections.defaultdict(list)  # user -> [(time, line no, item)]
  path = os.path.join(args.shared, "ml-1m-ratings-partial", "ratings.dat.gz")
  with gzip.open(path, "rt", encoding="latin-1") as f:
    for n, line in enumerate(f):
      user, item, _, stamp = line.strip().split("::")
      rated[int(user)].append((int(stamp), n, int(item)))
  seq = collections.defaultdict(list)
  path = os.path.join(args.shared, "ml-1m-bert4rec-preprocessed",
                      "ml-1m.seq.txt")
  with open(path) as f:
    for line in f:
      user, item = map(int, line.split())
      if user in rated:
        seq[user].append(item)
  ties = 0
  shuffle = random.Random(0)
  orders = {"seq_order": {}, "time_order": {}, "random_ties": {}}
  for user in sorted(rated):
    by_time = [item for _, _, item in sorted(rated[user])]
    if sorted(by_time) != sorted(seq[user]):
      raise ValueError(f"user {user}: different items in the two files")
    ties += by_time != seq[user]
    orders["seq_order"][user] = seq[user]
    orders["time_order"][user] = by_time
    keyed = [(stamp, shuffle.random(), item) for stamp, _, item in rated[user]]
    orders["random_ties"][user] = [item for _, _, item in sorted(keyed)]
  for name, users in orders.items():
    folder = os.path.join(args.out, name, "ml-1m-bert4rec-preprocessed")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ml-1m.seq.txt"), "w") as f:
      for user, items in users.items():
        f.writelines(f"{user} {item}\n" for item in items)
  same_second = sum(
      n for stamps in (collections.Counter(t for t, _, _ in r)
                       for r in rated.values())
      for n in stamps.values() if n > 1)
  total = sum(map(len, seq.values()))
  print(f"{len(rated)} users, {total} interactions; {same_second} "
        f"({same_second / total:.1%}) share their second with another of "
        f"the same user; {ties} users whose two orders differ; written to "
        f"{args.out}")


if __name__ == "__main__":
  main()
