//! Jain's fairness index, and the max-min fair shares that make it meaningful when users ask
//! for different amounts.

/// Jain's fairness index of `shares`: `(Σx)² / (n · Σx²)`, 1 when all are equal, `1/n` when one
/// has everything. An empty list, or one of zeros, is perfectly fair (1).
///
/// ```
/// use tower_llm_queue_servers::loadgen::jain;
///
/// assert_eq!(jain(&[3.0, 3.0, 3.0]), 1.0);
/// assert_eq!(jain(&[1.0, 0.0, 0.0, 0.0]), 0.25);
/// ```
pub fn jain(shares: &[f64]) -> f64 {
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    if squares == 0.0 || shares.is_empty() {
        return 1.0;
    }
    sum * sum / (shares.len() as f64 * squares)
}

/// The max-min fair allocation of `capacity` among users who ask for `demands`: by water
/// filling, each user gets what they asked for or an equal share of what is left, whichever is
/// smaller. Nobody could get more without taking from someone who has less.
///
/// ```
/// use tower_llm_queue_servers::loadgen::max_min;
///
/// // Ten light users asking 1 each and a heavy one asking 20, for 15: the light ones get all
/// // they ask, the heavy one the rest.
/// let mut demands = vec![1.0; 10];
/// demands.push(20.0);
/// let fair = max_min(&demands, 15.0);
/// assert_eq!(fair[0], 1.0);
/// assert_eq!(fair[10], 5.0);
/// ```
pub fn max_min(demands: &[f64], capacity: f64) -> Vec<f64> {
    let mut fair = vec![0.0; demands.len()];
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| demands[a].total_cmp(&demands[b]));
    let mut left = capacity.max(0.0);
    for (done, &user) in order.iter().enumerate() {
        let sharing = (order.len() - done) as f64;
        let share = left / sharing;
        let given = demands[user].max(0.0).min(share);
        fair[user] = given;
        left -= given;
    }
    fair
}

/// Jain's index of what each user got against their max-min fair share of everything that was
/// served: `served[i] / max_min(demands, Σ served)[i]`. It is 1 when the users who asked for
/// little got all of it and those who asked for more shared the rest equally, whatever their
/// demands; plain Jain over `served` would call that unfair as soon as demands differ. Users
/// whose fair share is zero (they asked for nothing) are left out.
///
/// ```
/// use tower_llm_queue_servers::loadgen::{jain, jain_max_min};
///
/// // The light users got what they asked for, the heavy one the rest: fair.
/// let demands = [1.0, 1.0, 1.0, 20.0];
/// assert_eq!(jain_max_min(&[1.0, 1.0, 1.0, 5.0], &demands), 1.0);
/// assert!(jain(&[1.0, 1.0, 1.0, 5.0]) < 0.6);
/// // Everybody got the same share of their demand (proportional throttling): the light users
/// // lose out.
/// assert!(jain_max_min(&[0.35, 0.35, 0.35, 7.0], &demands) < 0.8);
/// ```
pub fn jain_max_min(served: &[f64], demands: &[f64]) -> f64 {
    let total: f64 = served.iter().sum();
    let fair = max_min(demands, total);
    let ratios: Vec<f64> = served
        .iter()
        .zip(&fair)
        .filter(|(_, fair)| **fair > 0.0)
        .map(|(served, fair)| served / fair)
        .collect();
    jain(&ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_of_equal_and_skewed_shares() {
        assert_eq!(jain(&[]), 1.0);
        assert_eq!(jain(&[0.0, 0.0]), 1.0);
        assert_eq!(jain(&[5.0; 7]), 1.0);
        assert!((jain(&[1.0, 2.0]) - 0.9).abs() < 1e-12);
        assert_eq!(jain(&[4.0, 0.0]), 0.5);
    }

    #[test]
    fn max_min_fills_the_smallest_demands_first() {
        assert_eq!(max_min(&[2.0, 8.0, 4.0], 9.0), [2.0, 3.5, 3.5]);
        assert_eq!(max_min(&[2.0, 8.0, 4.0], 100.0), [2.0, 8.0, 4.0]);
        assert_eq!(max_min(&[2.0, 8.0], 0.0), [0.0, 0.0]);
        assert_eq!(max_min(&[], 5.0), Vec::<f64>::new());
        let fair = max_min(&[3.0, 3.0, 3.0], 6.0);
        assert_eq!(fair, [2.0, 2.0, 2.0]);
        assert_eq!(
            max_min(&[-1.0, 4.0], 2.0),
            [0.0, 2.0],
            "a negative demand asks for nothing"
        );
    }

    #[test]
    fn jain_max_min_judges_against_demand() {
        // Equal demands: the same as plain Jain.
        let served = [3.0, 5.0, 4.0];
        let equal = [10.0, 10.0, 10.0];
        assert!((jain_max_min(&served, &equal) - jain(&served)).abs() < 1e-12);
        // Somebody who asked for nothing is left out.
        assert_eq!(jain_max_min(&[2.0, 2.0, 0.0], &[5.0, 5.0, 0.0]), 1.0);
        // A light user starved while the heavy one got everything: unfair.
        assert!(jain_max_min(&[0.0, 10.0], &[2.0, 20.0]) < 0.6);
    }
}
